"""attnreid.viz"""
