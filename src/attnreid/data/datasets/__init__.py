"""attnreid.data.datasets"""
