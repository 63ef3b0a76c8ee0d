"""attnreid.data"""
