"""Is a generated picture the emoji its prompt names? Retrieval in a simple fixed feature space.

Each picture is cropped to its drawn part (the white border removed), padded square on white and
shrunk to 16x16 colour pixels; every reference emoji is ranked by Euclidean distance to it. A picture
"shows" its emoji when that emoji ranks first (top-1) or among the first five (top-5). Chance: 1 (or
5) in the number of references, 1,361 for the whole font.
"""
import numpy as np
from PIL import Image

# The fixed list bench/demo_quality.py measures, each generated with its index as the seed.
PROMPTS = [
    "red apple", "dog face", "rocket", "pineapple", "banana", "grapes", "watermelon", "cat face", "fire",
    "snowman", "hot beverage", "slice of pizza", "hamburger", "strawberry", "cherries", "lemon", "tangerine",
    "carrot", "broccoli", "mushroom", "hot pepper", "avocado", "cookie", "doughnut", "birthday cake",
    "crab", "octopus", "turtle", "butterfly", "honeybee", "tropical fish", "penguin", "frog face",
    "tiger face", "panda face", "sunflower", "cactus", "palm tree", "four leaf clover", "rainbow",
    "snowflake", "soccer ball", "basketball and hoop", "trophy", "guitar", "alarm clock", "key", "bicycle",
    "automobile", "airplane", "sailboat", "heavy black heart", "pile of poo", "ghost", "robot face",
    "thumbs up sign",
]
THUMBNAIL = 16
WHITE_LEVEL = 245  # a pixel with every channel above this is background


def thumbnail(image):
    """uint8 [H, W, 3] -> uint8 [16, 16, 3] of its drawn part."""
    image = np.asarray(image, dtype=np.uint8)
    drawn = (image < WHITE_LEVEL).any(axis=2)
    if drawn.any():
        rows, cols = np.where(drawn.any(axis=1))[0], np.where(drawn.any(axis=0))[0]
        image = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.full((side, side, 3), 255, np.uint8)
    square[(side - height) // 2:(side - height) // 2 + height, (side - width) // 2:(side - width) // 2 + width] = image
    return np.asarray(Image.fromarray(square).resize((THUMBNAIL, THUMBNAIL), Image.BOX))


def rank_of(image, references, index):
    """The rank (0: nearest) of references[index] among all references, by distance to `image`'s
    thumbnail. references: uint8 [N, 16, 16, 3] thumbnails."""
    distances = ((references.reshape(len(references), -1).astype(np.float32)
                  - thumbnail(image).reshape(1, -1).astype(np.float32)) ** 2).sum(axis=1)
    return int((distances < distances[index]).sum())


def load_references(path):
    """(names, uint8 [N, 16, 16, 3] thumbnails) from an .npz written by `write_references`."""
    data = np.load(path)
    return [str(n) for n in data["names"]], data["thumbnails"]


def write_references(path):
    """Render the font (tools/train_demo_model.py's data) and save every emoji's thumbnail."""
    from tools.train_demo_model import render_dataset
    names, images = render_dataset()
    np.savez_compressed(path, names=np.array(names), thumbnails=np.stack([thumbnail(i) for i in images]))
    return names
