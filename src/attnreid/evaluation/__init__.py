"""attnreid.evaluation"""
