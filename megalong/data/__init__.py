"""megalong.data"""
