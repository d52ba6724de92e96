"""Volumes and what is made of them before a model sees them: file formats (volume_io), intensity
normalisation, slices, keypoints, sparse annotations, augmentation, sample data and Dice scores."""
