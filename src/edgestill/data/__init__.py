"""edgestill.data"""
