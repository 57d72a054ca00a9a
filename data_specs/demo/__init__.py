"""data_specs/demo"""
