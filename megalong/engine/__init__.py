"""megalong.engine"""
