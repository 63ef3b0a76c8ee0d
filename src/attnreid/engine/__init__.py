"""attnreid.engine"""
