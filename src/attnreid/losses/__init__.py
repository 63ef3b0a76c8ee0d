"""attnreid.losses"""
