"""megalong.parallel"""
