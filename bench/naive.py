"""The naive multi-scale + flip loop: one forward per scale, flip and window, batch of one.

It is the benchmark's second peer for multi-scale evaluation and, in the tests, the reference that
segkit's batched ``predict_multiscale`` must reproduce with its default ``fusion="softmax"`` and
``window_placement="border"``: same resizing (``align_corners`` as passed, True by default as in
segkit), padding, windows (last one aligned to the border) and softmax averaging, just one window
at a time.
"""
import math

import torch
import torch.nn.functional as F


@torch.inference_mode()
def naive_multiscale(model, image, scales, flip, base_size, crop, num_classes, pad=(0, 0, 0),
                     align_corners=True):
    """Summed softmax probabilities C x H x W of normalised image 3 x H x W (``pad``: the
    normalised value of black, per channel)."""
    h, w = image.shape[1:]
    stride = int(crop * 2 / 3)
    total = image.new_zeros(num_classes, h, w)
    for scale in scales:
        long_side = math.ceil(base_size * scale)
        if h > w:
            sh, sw = long_side, int(w * long_side / h + 0.5)
        else:
            sh, sw = int(h * long_side / w + 0.5), long_side
        ph, pw = max(sh, crop), max(sw, crop)
        img = torch.tensor(pad, dtype=image.dtype, device=image.device).view(3, 1, 1).repeat(1, ph, pw)
        img[:, :sh, :sw] = F.interpolate(image[None], (sh, sw), mode="bilinear",
                                         align_corners=align_corners)[0]
        for mirrored in (False, True) if flip else (False,):
            acc, count = image.new_zeros(num_classes, ph, pw), image.new_zeros(ph, pw)
            for y in list(range(0, ph - crop, stride)) + [ph - crop]:
                for x in list(range(0, pw - crop, stride)) + [pw - crop]:
                    win = img[None, :, y:y + crop, x:x + crop]
                    if mirrored:
                        prob = model(win.flip(-1))["out"].float().softmax(1).flip(-1)[0]
                    else:
                        prob = model(win)["out"].float().softmax(1)[0]
                    acc[:, y:y + crop, x:x + crop] += prob
                    count[y:y + crop, x:x + crop] += 1
            out = (acc / count)[None, :, :sh, :sw]
            total += F.interpolate(out, (h, w), mode="bilinear", align_corners=align_corners)[0]
    return total
