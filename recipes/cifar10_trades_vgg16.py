"""TRADES with VGG-16 on CIFAR-10. Profiles and options: recipes/__init__.py."""
from recipes import cell_main

if __name__ == "__main__":
    cell_main(__spec__.name)
