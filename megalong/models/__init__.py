"""megalong.models"""
