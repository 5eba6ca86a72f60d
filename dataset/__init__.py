"""The data code, one module per concern:

- ``description``: what a dataset is (presets, this repository's, Decathlon and nnU-Net v2 JSON files);
- ``cases``: finding its cases and pairing their files, cross-validation folds;
- ``checks``: reading every file through and checking it, remembered between runs;
- ``fingerprint``: the training cases' fingerprint and the settings derived from it, remembered;
- ``transforms``: the MONAI transform chains.

``load_datasets_transforms.py`` keeps the published entry points (``data_loader``, ``data_transforms``).
"""
