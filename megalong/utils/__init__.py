"""megalong.utils"""
