"""Data preparation: case discovery, resampling, intensity normalisation, crops, the LMDB index, phantoms.

The preprocessing functions here (resample, intensity, crop) are the single implementation shared by
training and inference.
"""
