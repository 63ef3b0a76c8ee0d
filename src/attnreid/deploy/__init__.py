"""attnreid.deploy"""
