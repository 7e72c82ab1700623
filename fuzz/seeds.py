"""Write the seed corpus of every fuzz target into fuzz/corpus/<target>/ (run once; the seeds are committed)."""
import gzip, io, json, os, struct, tarfile
from PIL import Image

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def img(fmt, size=(5, 4)):
    b = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(b, fmt)
    return b.getvalue()


cfg_dir = os.path.join(os.path.dirname(root), "..", "configs")
for f in sorted(os.listdir(cfg_dir)):
    put("config", f, open(os.path.join(cfg_dir, f), "rb").read())
images = struct.pack(">I", 0x803) + struct.pack(">III", 2, 4, 4) + bytes(range(32))
labels = struct.pack(">I", 0x801) + struct.pack(">I", 2) + bytes([3, 7])
put("idx", "plain", b"\x00" + struct.pack("<H", len(images)) + images + labels)
gi, gl = gzip.compress(images), gzip.compress(labels)
put("idx", "gzip", b"\x03" + struct.pack("<H", len(gi)) + gi + gl)
for fmt, ext in [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")]:
    put("image", ext, img(fmt))
put("image", "gray.png", (lambda b: (Image.new("L", (3, 3), 9).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()))
put("csv", "comma", b"\x00filepath,title\nimg.png,a red square\nmissing.jpg,a cat\n")
put("csv", "tab", b"\x01filepath\ttitle\nimg.png\ta red square\n")
tar = io.BytesIO()
with tarfile.open(fileobj=tar, mode="w", format=tarfile.GNU_FORMAT) as t:
    for name, data in [("x/a.png", img("PNG")), ("x/a.txt", b"a red square"), ("x/a.cls", b"3"),
                       ("x/b.jpg", img("JPEG")), ("x/b.json", b'{"caption": "a cat", "label": 1}')]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
put("webdataset", "shard.tar", tar.getvalue())
vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "photo": 5, "of": 6, "red": 7, "square": 8}
special = lambda c, i: {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True}
tok = {"version": "1.0", "truncation": None, "padding": None,
       "added_tokens": [special(c, i) for c, i in list(vocab.items())[:4]],
       "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
       "post_processor": None, "decoder": None,
       "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
put("tokenizer", "word_level.json", json.dumps(tok))
put("synonyms", "tsv", "red\tcrimson,scarlet\nsquare\tbox\n# comment\nphoto\tpicture\n")
state = {"step": 4, "epoch": 0, "seed": 3, "world_size": 2, "global_batch": 8, "loss": 1.5,
         "method": "Simclr", "loss_name": "NtXent", "dataset_len": 240, "run_id": 7,
         "bad_samples": [3], "dataset_fingerprint": "00ff"}
data = struct.pack("<4f", 1, 2, 3, 4)
header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
st = struct.pack("<Q", len(header)) + header + data
s = json.dumps(state).encode()
put("checkpoint", "ckpt", struct.pack("<H", len(s)) + s + st)
