"""Step one of MEKD: a GAN trained on the private images, so only synthetic images leave the edge."""
