"""Using a trained model: masks for your own images (``run.py predict``) and Fig. 5-style
pictures of a split (``run.py visualize``)."""
