"""attnreid.robustness"""
