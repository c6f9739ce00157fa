"""megalong.attention"""
