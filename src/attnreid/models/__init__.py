"""attnreid.models"""
