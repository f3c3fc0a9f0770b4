"""edgestill.models"""
