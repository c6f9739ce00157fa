"""megalong.lora"""
