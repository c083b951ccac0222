"""Standard training with SmallCNN on MNIST. Profiles and options: recipes/__init__.py."""
from recipes import cell_main

if __name__ == "__main__":
    cell_main(__spec__.name)
