"""edgestill.evaluate"""
