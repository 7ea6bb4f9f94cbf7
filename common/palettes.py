"""Colour tables and class names of the segmentation datasets, and colour overlays of predictions.

The tables are the ones mmsegmentation 1.x shows for each dataset (``METAINFO`` of
``mmseg/datasets/{ade,cityscapes,voc,coco_stuff,pascal_context}.py``), so an overlay made here looks
like one made by mmseg's visualiser or ViT-Adapter's ``image_demo.py``:

- ``ade20k``: the 150-colour ADE20K table (entry 0 = wall).
- ``cityscapes``: the 19 official train-id colours of cityscapesScripts (road = purple ...).
- ``voc``: the standard PASCAL VOC colour map, built by spreading the bits of the class index over
  R, G and B (class 1 = (128, 0, 0)); it is the palette stored inside VOC's label PNGs.
- ``coco_stuff``: mmseg's 171-colour COCO-Stuff table.
- ``pascal_context``: mmseg's PascalContextDataset59 table, which is the ADE20K table shifted by one
  (entries 1..59 of it).
- ``synthetic``: the VOC colour map, for ``SyntheticSeg``.

``comparison`` draws what a reader needs to judge a prediction: image | ground truth | prediction side by
side, ignored pixels as a grey checkerboard, and a legend of the classes present in either, at a size
where it can be read (small images upscaled by an integer factor with nearest, large ones downscaled).

Overlays follow mmseg's ``show_result``: ``img * (1 - opacity) + colour * opacity``, truncated to uint8;
unlike mmseg, pixels labelled 255 (ignore) or with no colour are left as they are instead of being
blended with black.
"""
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .io import UserError


def voc_colormap(n):
    """The PASCAL VOC colour map of length ``n``: bit j of the class index goes to bit 7-j//3 of R, G
    or B (j % 3). Deterministic and distinct for any n < 2**24, so it is also the fallback palette."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


_ADE20K = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
]

_CITYSCAPES = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]

_COCO_STUFF = [
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224),
    (0, 192, 192), (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224),
    (0, 0, 64), (0, 160, 192), (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224),
    (0, 0, 192), (128, 160, 192), (128, 128, 0), (128, 0, 32), (128, 32, 0), (128, 0, 128),
    (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160), (0, 32, 0), (0, 128, 128),
    (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128), (0, 0, 128),
    (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192),
    (0, 128, 32), (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192),
    (0, 128, 160), (192, 224, 0), (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192),
    (0, 0, 32), (64, 160, 128), (128, 64, 64), (128, 0, 160), (64, 32, 128), (128, 192, 192),
    (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0), (128, 64, 128),
    (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128),
    (64, 0, 224), (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192),
    (0, 128, 96), (0, 224, 0), (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192),
    (0, 128, 224), (128, 224, 0), (64, 192, 64), (128, 128, 96), (128, 32, 128), (64, 0, 192),
    (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224), (0, 32, 128), (192, 128, 192),
    (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32), (128, 32, 64), (192, 0, 128),
    (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64), (64, 128, 128),
    (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192), (64, 0, 128),
    (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128),
    (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192),
    (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160), (64, 96, 64), (64, 128, 192),
    (0, 192, 160), (192, 224, 64), (64, 128, 64), (128, 192, 32), (192, 32, 192), (64, 64, 192),
    (0, 64, 32), (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192),
    (0, 64, 160), (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128),
    (64, 192, 96), (64, 160, 64), (64, 64, 0),
]

PALETTES = {
    "ade20k": _ADE20K,
    "cityscapes": _CITYSCAPES,
    "voc": voc_colormap(21),
    "coco_stuff": _COCO_STUFF,
    "pascal_context": _ADE20K[1:60],
    "synthetic": voc_colormap(16),
}

_ADE20K_NAMES = (
    "wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk, person, "
    "earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf, house, sea, "
    "mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub, railing, cushion, "
    "base, box, column, signboard, chest of drawers, counter, sand, sink, skyscraper, fireplace, "
    "refrigerator, grandstand, path, stairs, runway, case, pool table, pillow, screen door, stairway, "
    "river, bridge, bookcase, blind, coffee table, toilet, flower, book, hill, bench, countertop, stove, "
    "palm, kitchen island, computer, swivel chair, boat, bar, arcade machine, hovel, bus, towel, light, "
    "truck, tower, chandelier, awning, streetlight, booth, television receiver, airplane, dirt track, "
    "apparel, pole, land, bannister, escalator, ottoman, bottle, buffet, poster, stage, van, ship, "
    "fountain, conveyer belt, canopy, washer, plaything, swimming pool, stool, barrel, basket, waterfall, "
    "tent, bag, minibike, cradle, oven, ball, food, step, tank, trade name, microwave, pot, animal, "
    "bicycle, lake, dishwasher, screen, blanket, sculpture, hood, sconce, vase, traffic light, tray, "
    "ashcan, fan, pier, crt screen, plate, monitor, bulletin board, shower, radiator, glass, clock, flag")

_CITYSCAPES_NAMES = (
    "road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain, sky, "
    "person, rider, car, truck, bus, train, motorcycle, bicycle")

_VOC_NAMES = (
    "background, aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, diningtable, dog, "
    "horse, motorbike, person, pottedplant, sheep, sofa, train, tvmonitor")

_COCO_STUFF_NAMES = (
    # the 80 COCO thing classes ...
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, "
    "stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, "
    "backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, "
    "baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle, wine glass, cup, fork, "
    "knife, spoon, bowl, banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake, "
    "chair, couch, potted plant, bed, dining table, toilet, tv, laptop, mouse, remote, keyboard, "
    "cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors, teddy bear, "
    "hair drier, toothbrush, "
    # ... then the 91 stuff classes
    "banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard, carpet, "
    "ceiling-other, ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain, desk-stuff, dirt, "
    "door-stuff, fence, floor-marble, floor-other, floor-stone, floor-tile, floor-wood, flower, fog, "
    "food-other, fruit, furniture-other, grass, gravel, ground-other, hill, house, leaves, light, mat, "
    "metal, mirror-stuff, moss, mountain, mud, napkin, net, paper, pavement, pillow, plant-other, "
    "plastic, platform, playingfield, railing, railroad, river, road, rock, roof, rug, salad, sand, sea, "
    "shelf, sky-other, skyscraper, snow, solid-other, stairs, stone, straw, structural-other, table, "
    "tent, textile-other, towel, tree, vegetable, wall-brick, wall-concrete, wall-other, wall-panel, "
    "wall-stone, wall-tile, wall-wood, water-other, waterdrops, window-blind, window-other, wood")

_PASCAL_CONTEXT_NAMES = (
    "aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus, cabinet, "
    "car, cat, ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence, floor, flower, food, "
    "grass, ground, horse, keyboard, light, motorbike, mountain, mouse, person, plate, platform, "
    "pottedplant, road, rock, sheep, shelves, sidewalk, sign, sky, snow, sofa, table, track, train, tree, "
    "truck, tvmonitor, wall, water, window, wood")


def _names(s):
    return [n.strip() for n in s.split(",")]


CLASSES = {
    "ade20k": _names(_ADE20K_NAMES),
    "cityscapes": _names(_CITYSCAPES_NAMES),
    "voc": _names(_VOC_NAMES),
    "coco_stuff": _names(_COCO_STUFF_NAMES),
    "pascal_context": _names(_PASCAL_CONTEXT_NAMES),
    "synthetic": ["background", "disc", "square", "triangle", "ring", "cross", "ellipse", "half disc",
                  "bar"],
}

# dataset names of common.seg_data -> palette names
_ALIASES = {"voc_aug": "voc", "coco_stuff10k": "coco_stuff", "coco_stuff164k": "coco_stuff",
            "pascal_context59": "pascal_context", "ade": "ade20k", "gta5": "cityscapes", "synthia": "cityscapes",
            "acdc_fog": "cityscapes", "acdc_night": "cityscapes", "acdc_rain": "cityscapes",
            "acdc_snow": "cityscapes", "synthetic_target": "synthetic"}


def get_palette(name, num_classes=None):
    """(K, 3) uint8 colours for a palette or dataset name. ``num_classes`` cuts the table or extends it
    with the VOC colour map; an unknown name gets the VOC colour map of that length."""
    key = _ALIASES.get(name, name)
    known = PALETTES.get(key)
    if known is None:
        if num_classes is None:
            raise UserError(f"unknown palette {name!r} and no num_classes given; known palettes: "
                            f"{', '.join(PALETTES)}")
        return np.array(voc_colormap(num_classes), dtype=np.uint8).reshape(-1, 3)
    n = len(known) if num_classes is None else num_classes
    colours = list(known[:n]) + voc_colormap(n)[len(known):]
    return np.array(colours, dtype=np.uint8).reshape(-1, 3)


def overlay(img_rgb_uint8, pred, palette, opacity=0.5):
    """img * (1 - opacity) + palette[pred] * opacity, truncated to uint8 as mmseg's show_result does.
    Pixels whose class has no colour (255 = ignore, or >= len(palette)) keep the image unchanged."""
    img = np.asarray(img_rgb_uint8)
    pred = np.asarray(pred)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"overlay expects an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}")
    if pred.shape != img.shape[:2]:
        raise ValueError(f"overlay: prediction {pred.shape} and image {img.shape[:2]} differ in size")
    pal = np.asarray(palette, dtype=np.float64).reshape(-1, 3)
    has_colour = (pred >= 0) & (pred < len(pal))
    colour = pal[np.where(has_colour, pred, 0)]  # (H, W) -> (H, W, 3)
    blended = (img.astype(np.float64) * (1 - opacity) + colour * opacity).astype(np.uint8)
    return np.where(has_colour[..., None], blended, img)


def save_overlay(path, img_rgb_uint8, pred, palette, opacity=0.5):
    """Writes the overlay as PNG or JPEG (by the extension) via PIL, creating the folder."""
    out = overlay(img_rgb_uint8, pred, palette, opacity)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    try:
        jpeg = os.path.splitext(path)[1].lower() in (".jpg", ".jpeg")
        Image.fromarray(out).save(path, **({"quality": 95} if jpeg else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write overlay {path}: {e}") from None


def class_names(name, num_classes):
    """Class names of a palette / dataset name, cut or padded ('class 23') to ``num_classes``."""
    known = CLASSES.get(_ALIASES.get(name, name), [])
    return [known[k] if k < len(known) else f"class {k}" for k in range(num_classes)]


def colourize(label, palette, tile=8):
    """(H, W) class indices -> (H, W, 3) uint8 colours; pixels with no colour (255 = ignored, or past the
    palette) get a grey checkerboard of ``tile`` pixels."""
    label = np.asarray(label).astype(np.int64)
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    ok = (label >= 0) & (label < len(pal))
    out = pal[np.where(ok, label, 0)]
    return np.where(ok[..., None], out, _checker(label.shape, tile))


def _checker(shape, tile):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    light = (yy // tile + xx // tile) % 2 == 0
    return np.where(light[..., None], 205, 150).astype(np.uint8) * np.ones(3, np.uint8)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow, or no FreeType: the small bitmap font
        return ImageFont.load_default()


def legend(classes, palette, names, width, ignored=False, font_size=14):
    """(h, width, 3) uint8: a swatch and 'k name' per class in ``classes``, wrapped into rows of
    ``width`` pixels; with ``ignored``, a checkerboard swatch for the ignored pixels last."""
    font = _font(font_size)
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    sw, pad = font_size + 2, font_size // 2
    entries = [(f"{k} {names[k] if k < len(names) else ''}".strip(), tuple(int(c) for c in pal[k]))
               for k in classes if 0 <= k < len(pal)]
    if ignored:
        entries.append(("ignored (255)", None))
    rows, x = [[]], pad
    for text, colour in entries:
        w = sw + 4 + int(math.ceil(font.getlength(text))) + 2 * pad
        if x + w > width and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((x, text, colour))
        x += w
    row_h = sw + pad
    im = Image.new("RGB", (width, pad + row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for r, row in enumerate(rows):
        y = pad + r * row_h
        for x, text, colour in row:
            if colour is None:
                im.paste(Image.fromarray(_checker((sw, sw), max(2, sw // 4))), (x, y))
            else:
                draw.rectangle([x, y, x + sw - 1, y + sw - 1], fill=colour)
            draw.rectangle([x, y, x + sw - 1, y + sw - 1], outline=(0, 0, 0))
            draw.text((x + sw + 4, y + sw / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(im)


def panel_scale(h, low=256, high=512):
    """Display scale of an image of height h: an integer upscale (nearest) up to at least ``low`` pixels,
    or a downscale to ``high`` pixels; 1 in between."""
    if h < low:
        return math.ceil(low / h)
    return high / h if h > high else 1


def comparison(img, gt, pred, palette, names, ignore_index=255):
    """(H', W', 3) uint8: image | ground truth | prediction at a readable size (``panel_scale``), with
    titles and a legend of the classes present in the ground truth or the prediction."""
    img, gt, pred = np.asarray(img), np.asarray(gt), np.asarray(pred)
    h, w = img.shape[:2]
    s = panel_scale(h)
    size = (max(1, round(w * s)), max(1, round(h * s)))  # PIL: (W, H)
    resample = Image.NEAREST if s >= 1 else Image.BILINEAR
    shown = np.asarray(Image.fromarray(img).resize(size, resample)) if s != 1 else img

    def scaled(label):
        lab = Image.fromarray(np.asarray(label).astype(np.int32))
        return np.asarray(lab.resize(size, Image.NEAREST)) if s != 1 else np.asarray(label)
    gt_s, pred_s = scaled(gt), scaled(pred)
    font_size = max(14, size[1] // 28)
    gap, title_h = 6, font_size + 8
    width = 3 * size[0] + 2 * gap
    canvas = Image.new("RGB", (width, title_h + size[1]), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    for i, (title, panel) in enumerate((("image", shown), ("ground truth", colourize(gt_s, palette)),
                                        ("prediction", colourize(pred_s, palette)))):
        x = i * (size[0] + gap)
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (x, title_h))
        draw.text((x + size[0] / 2, title_h / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    present = sorted(set(np.unique(gt).tolist()) | set(np.unique(pred).tolist()) - {ignore_index})
    present = [k for k in present if k != ignore_index]
    key = legend(present, palette, names, width, ignored=bool((gt == ignore_index).any()), font_size=font_size)
    return np.concatenate([np.asarray(canvas), key], axis=0)


def save_image(path, array):
    """Writes an (H, W, 3) uint8 array as PNG / JPEG (by the extension), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        jpeg = os.path.splitext(path)[1].lower() in (".jpg", ".jpeg")
        Image.fromarray(array).save(path, **({"quality": 95} if jpeg else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write image {path}: {e}") from None
