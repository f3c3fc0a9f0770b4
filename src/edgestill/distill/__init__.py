"""edgestill.distill"""
