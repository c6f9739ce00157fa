"""megalong.eval"""
