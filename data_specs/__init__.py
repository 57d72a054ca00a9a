"""data_specs"""
