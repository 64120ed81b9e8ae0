"""Scripts that build the dataset files of ``--data celebahq/celeba_5bit/imagenet32/imagenet64``.

Run them as scripts (``python preprocessing/NAME.py --help``); see README.md in this folder. The package
form only exists so that the tests can import their functions.
"""
