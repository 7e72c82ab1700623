//! Source tests: image folders, CSVs, shards and their index caches.

use super::cifar::pickle_batch;
use super::*;

pub(crate) fn png_bytes(v: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(6, 5, |x, y| image::Rgb([v, x as u8, y as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A tar file of `members` (name, bytes), in order.
fn write_tar(path: &Path, members: &[(&str, &[u8])]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn image_folder_sorts_classes_and_files() {
    let dir = tempfile::tempdir().unwrap();
    for (class, files) in [("zebra", vec!["b.png", "a.png"]), ("ant", vec!["c.PNG", "notes.txt"])] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for f in files {
            std::fs::write(dir.path().join(class).join(f), png_bytes(1)).unwrap();
        }
    }
    let s = ImageFolder::open(dir.path()).unwrap();
    assert_eq!(s.class_names(), vec!["ant", "zebra"]);
    assert_eq!(s.len(), 3);
    assert!(s.locate(0).ends_with("ant/c.PNG") && s.locate(1).ends_with("zebra/a.png"));
    assert_eq!(s.fetch(2).unwrap().label, 1);
    let empty = tempfile::tempdir().unwrap();
    assert!(ImageFolder::open(empty.path()).unwrap_err().to_string().contains("no images"));
}

#[test]
fn csv_reads_open_clip_layout_and_names_missing_columns() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.png"), png_bytes(9)).unwrap();
    std::fs::write(dir.path().join("d.tsv"), "filepath\ttitle\nx.png\ta red square\n").unwrap();
    let s = CsvSource::open(&dir.path().join("d.tsv"), "filepath", "title", Some(b'\t')).unwrap();
    let r = s.fetch(0).unwrap();
    assert_eq!(r.caption.as_deref(), Some("a red square"));
    assert_eq!(r.bytes, png_bytes(9));
    let err = CsvSource::open(&dir.path().join("d.tsv"), "image", "title", Some(b'\t')).unwrap_err().to_string();
    assert!(err.contains("no column `image`") && err.contains("d.tsv"), "{err}");
    // `auto`: a comma-separated .csv (quoted, with a comma inside a caption) reads as such.
    std::fs::write(dir.path().join("d.csv"), "\"filepath\",title,extra\nx.png,\"a red, square\",1\n").unwrap();
    let s = CsvSource::open(&dir.path().join("d.csv"), "filepath", "title", None).unwrap();
    assert_eq!(s.fetch(0).unwrap().caption.as_deref(), Some("a red, square"));
    assert!(CsvSource::open(&dir.path().join("d.tsv"), "filepath", "title", None).is_ok());
    // A separator given wrongly: the error says which one was used and the key to change.
    let err = CsvSource::open(&dir.path().join("d.csv"), "filepath", "title", Some(b'\t')).unwrap_err().to_string();
    assert!(err.contains("separator '\\t'") && err.contains("data.csv_separator"), "{err}");
    let err = CsvSource::open(&dir.path().join("d.csv"), "image", "title", None).unwrap_err().to_string();
    assert!(err.contains("d.csv") && err.contains("data.csv_img_key"), "{err}");
}

fn write_shard(path: &Path, keys: &[(&str, u8, Option<&str>, Option<i64>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    for (key, v, txt, cls) in keys {
        add(format!("{key}.png"), &png_bytes(*v));
        if let Some(t) = txt {
            add(format!("{key}.txt"), t.as_bytes());
        }
        if let Some(c) = cls {
            add(format!("{key}.cls"), c.to_string().as_bytes());
        }
    }
    b.finish().unwrap();
}

#[test]
fn webdataset_cls_labels_outside_the_bound_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l-0.tar");
    write_tar(&path, &[("k/a.png", &png_bytes(1)), ("k/a.cls", b"1000000000000")]);
    let err = WebDataset::open(path.to_str().unwrap()).err().unwrap().to_string();
    assert!(err.contains("a.cls") && err.contains("l-0.tar"), "{err}");
}

#[test]
fn webdataset_json_metadata_fills_caption_and_label() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j-0.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("x/a.jpg", &png_bytes(4));
    add("x/a.json", br#"{"caption": "from json", "label": 5, "width": 6}"#);
    add("x/b.png", &png_bytes(5));
    add("x/b.txt", b"from txt");
    add("x/b.json", br#"{"caption": "ignored: .txt wins", "cls": 2}"#);
    add("x/c.png", &png_bytes(6));
    add("x/c.json", b"{not json");
    add("x/d.png", &png_bytes(7));
    add("x/d.json", br#"{"label": 1000000000000}"#);
    b.finish().unwrap();
    let ds = WebDataset::open(path.to_str().unwrap()).unwrap();
    let a = ds.fetch(0).unwrap();
    assert_eq!((a.caption.as_deref(), a.label), (Some("from json"), 5));
    let b = ds.fetch(1).unwrap();
    assert_eq!((b.caption.as_deref(), b.label), (Some("from txt"), 2));
    // Captions alone (retrieval) come from the text members, the same as a fetch gives.
    assert_eq!((ds.caption(0).as_deref(), ds.caption(1).as_deref()), (Some("from json"), Some("from txt")));
    // A bad .json makes the sample unreadable (skipped and counted by the pipeline), naming it.
    let err = ds.fetch(2).unwrap_err();
    assert!(err.contains("c.json") && err.contains("j-0.tar"), "{err}");
    // An absurd label is refused, naming the member, before evaluation could size a table by it.
    let err = ds.fetch(3).unwrap_err();
    assert!(err.contains("d.json") && err.contains("outside"), "{err}");
    // The cached index keeps the .json spans.
    assert_eq!(WebDataset::open(path.to_str().unwrap()).unwrap().samples, ds.samples);
}

#[test]
fn webdataset_indexes_shards_and_reuses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(&dir.path().join("s-00.tar"), &[("a", 1, Some("first"), Some(3)), ("b", 2, Some("second"), None)]);
    write_shard(&dir.path().join("s-01.tar"), &[("c", 3, None, Some(7))]);
    let pattern = format!("{}/s-{{00..01}}.tar", dir.path().display());
    let ds = WebDataset::open(&pattern).unwrap();
    assert_eq!(ds.len(), 3);
    let s0 = ds.fetch(0).unwrap();
    assert_eq!((s0.caption.as_deref(), s0.label, s0.bytes == png_bytes(1)), (Some("first"), 3, true));
    assert_eq!(ds.fetch(2).unwrap().label, 7);
    assert!(ds.locate(1).ends_with("s-00.tar#b"));
    let idx = dir.path().join("s-00.tar.contrast-index");
    assert!(idx.is_file());
    // Cached index is read back identically; a changed shard is re-indexed.
    assert_eq!(WebDataset::open(&pattern).unwrap().samples, ds.samples);
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_shard(&dir.path().join("s-00.tar"), &[("z", 5, Some("new"), None)]);
    let again = WebDataset::open(&pattern).unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(again.fetch(0).unwrap().caption.as_deref(), Some("new"));
    assert_eq!(expand_braces("x{8..10}y").unwrap(), vec!["x8y", "x9y", "x10y"]);
    assert_eq!(expand_braces("{000..002}.tar").unwrap(), vec!["000.tar", "001.tar", "002.tar"]);
    assert!(WebDataset::open(&format!("{}/none-{{0..1}}.tar", dir.path().display())).is_err());
}

#[test]
fn webdataset_cache_survives_hostile_names_and_refuses_torn_or_forged_caches() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("h-0.tar");
    write_shard(&shard, &[("tab\there\nnew", 1, Some("a"), Some(1)), ("b", 2, None, None), ("c", 3, None, Some(2))]);
    let name = shard.to_str().unwrap();
    let first = WebDataset::open(name).unwrap();
    assert_eq!(first.samples[0].1.key, "tab\there\nnew");
    assert_eq!(first.first_unlabelled(), Some(1));
    let idx = dir.path().join("h-0.tar.contrast-index");
    let cached = std::fs::read_to_string(&idx).unwrap();
    // The key round-trips through the cache.
    assert_eq!(WebDataset::open(name).unwrap().samples, first.samples);
    // A cache torn at a line boundary, or with a forged span of 100 GB, is re-indexed.
    let (head, _) = cached.split_once('\n').unwrap();
    let forged = cached.replacen("\"len\":", "\"len\":100000000000", 1);
    let stamp_only = format!("{head}\n");
    for bad in [stamp_only, forged, cached[..cached.len() - 5].to_string()] {
        std::fs::write(&idx, &bad).unwrap();
        let again = WebDataset::open(name).unwrap();
        assert_eq!(again.samples, first.samples);
        assert_eq!(again.fetch(0).unwrap().label, 1);
        assert_eq!(std::fs::read_to_string(&idx).unwrap(), cached, "the cache is rewritten whole");
    }
    // A forged span that passes the checksum (recomputed) still must lie inside the shard.
    let body = cached.split_once('\n').unwrap().1.replacen("\"len\":", "\"len\":100000000000", 1);
    let (size, stamp) = stamp(&shard).unwrap();
    let err = parse_index(&format!("{stamp} members=3 sha256={}\n{body}", sha256_hex(body.as_bytes())), &stamp, size);
    assert!(err.unwrap_err().contains("past the shard's end"));
    // A truncated shard is refused naming the member that runs past its end.
    let bytes = std::fs::read(&shard).unwrap();
    let cut = dir.path().join("t-0.tar");
    std::fs::write(&cut, &bytes[..1024 + 100]).unwrap();
    let err = WebDataset::open(cut.to_str().unwrap()).err().unwrap().to_string();
    assert!(err.contains("t-0.tar") && (err.contains("ends past") || err.contains("corrupt tar")), "{err}");
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(left.is_empty());
}

#[test]
fn brace_ranges_are_bounded_and_fingerprints_see_names() {
    assert!(expand_braces("s{0..99999999999}.tar").unwrap_err().contains("more than"));
    assert!(expand_braces("{0..2000}-{0..2000}.tar").unwrap_err().contains("more than"));
    assert!(expand_braces("a{0..999999}.tar::b{0..999999}.tar").unwrap_err().contains("more than"));
    assert_ne!(crate::fingerprint([&b"ab"[..], b"c"]), crate::fingerprint([&b"a"[..], b"bc"]));
}

/// A CIFAR pickle as the Python 2 `cPickle` of the CIFAR release lays it out
/// (protocol 2, byte-string keys, `data` a numpy uint8 array `[n, 3072]`
/// pickled through `numpy.core.multiarray._reconstruct`), from opcodes.
pub(crate) fn cifar_pickle(labels_key: &str, labels: &[u8], pixels: &[u8]) -> Vec<u8> {
    let s = |out: &mut Vec<u8>, b: &[u8]| {
        out.push(b'U');
        out.push(b.len() as u8);
        out.extend_from_slice(b);
    };
    let int = |out: &mut Vec<u8>, v: i32| {
        out.push(b'J');
        out.extend_from_slice(&v.to_le_bytes());
    };
    let mut o = vec![0x80, 2, b'}', b'('];
    s(&mut o, labels_key.as_bytes());
    o.extend([b']', b'(']);
    for &l in labels {
        o.extend([b'K', l]);
    }
    o.push(b'e');
    s(&mut o, b"data");
    o.extend_from_slice(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85");
    s(&mut o, b"b");
    o.extend([0x87, b'R', b'(', b'K', 1]);
    int(&mut o, labels.len() as i32);
    int(&mut o, 3072);
    o.extend_from_slice(b"\x86cnumpy\ndtype\n");
    s(&mut o, b"u1");
    o.extend([0x89, 0x88, 0x87, b'R', b'(', b'K', 3]);
    s(&mut o, b"|");
    o.extend([b'N', b'N', b'N']);
    int(&mut o, -1);
    int(&mut o, -1);
    o.extend([b'K', 0, b't', b'b', 0x89, b'T']);
    o.extend_from_slice(&(pixels.len() as u32).to_le_bytes());
    o.extend_from_slice(pixels);
    o.extend([b't', b'b', b'u', b'.']);
    o
}

fn cifar_images(n: usize, salt: u8) -> (Vec<u8>, Vec<u8>) {
    let pixels = (0..n * 3072).map(|i| (i as u8).wrapping_mul(7).wrapping_add(salt)).collect();
    let labels = (0..n).map(|i| (i as u8 * 3 + salt) % 10).collect();
    (pixels, labels)
}

#[test]
fn cifar_reads_the_pickle_and_the_binary_batches_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (py, bin) = (dir.path().join("cifar-10-batches-py"), dir.path().join("bin/cifar-10-batches-bin"));
    std::fs::create_dir_all(&py).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let mut all = (Vec::new(), Vec::new());
    for b in 1..=5u8 {
        let (p, l) = cifar_images(2, b);
        std::fs::write(py.join(format!("data_batch_{b}")), cifar_pickle("labels", &l, &p)).unwrap();
        let records: Vec<u8> =
            l.iter().zip(p.chunks(3072)).flat_map(|(&l, px)| std::iter::once(l).chain(px.iter().copied())).collect();
        std::fs::write(bin.join(format!("data_batch_{b}.bin")), records).unwrap();
        all.0.extend(p);
        all.1.extend(l);
    }
    let (p, l) = cifar_images(3, 9);
    std::fs::write(py.join("test_batch"), cifar_pickle("labels", &l, &p)).unwrap();
    let names = (0..10).map(|i| format!("c{i}\n")).collect::<String>();
    std::fs::write(bin.join("batches.meta.txt"), names).unwrap();
    let a = CifarSource::open(dir.path(), Cifar::Ten, true).unwrap();
    let b = CifarSource::open(&dir.path().join("bin"), Cifar::Ten, true).unwrap();
    assert_eq!((a.len(), b.len()), (10, 10));
    assert_eq!(a.fingerprint(), b.fingerprint(), "the two layouts hold the same images");
    assert_eq!(b.class_names()[3], "c3");
    // Sample 7 decodes to the planar pixels of image 7, interleaved.
    let rgb = crate::rgb::decode(&a.fetch(7).unwrap().bytes).unwrap();
    assert_eq!((rgb.width, rgb.height), (32, 32));
    let planes = &all.0[7 * 3072..8 * 3072];
    assert_eq!(&rgb.data[..6], &[planes[0], planes[1024], planes[2048], planes[1], planes[1025], planes[2049]]);
    assert_eq!(a.fetch(7).unwrap().label, all.1[7] as i64);
    assert_eq!(CifarSource::open(dir.path(), Cifar::Ten, false).unwrap().len(), 3);
    // A pickle as Python 3 and numpy 2 write it (bytes through `_codecs.encode`).
    let real = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/assets/cifar_numpy2_protocol2.pkl")).unwrap();
    let (pixels, labels) = pickle_batch(Path::new("real.pkl"), &real, Cifar::Ten).unwrap();
    assert_eq!((labels, pixels.len(), pixels[3073]), (vec![3, 7], 6144, (3073 % 256) as u8));
}

#[test]
fn cifar_100_and_broken_batches_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = cifar_images(4, 1);
    let fine = [0u8, 42, 99, 7];
    let records: Vec<u8> =
        fine.iter().zip(p.chunks(3072)).flat_map(|(&l, px)| [5u8, l].into_iter().chain(px.iter().copied())).collect();
    std::fs::write(dir.path().join("train.bin"), &records).unwrap();
    let s = CifarSource::open(dir.path(), Cifar::Hundred, true).unwrap();
    assert_eq!((0..4).map(|i| s.fetch(i).unwrap().label).collect::<Vec<_>>(), [0, 42, 99, 7]);
    std::fs::write(dir.path().join("train.bin"), &records[..records.len() - 1]).unwrap();
    let e = CifarSource::open(dir.path(), Cifar::Hundred, true).err().unwrap().to_string();
    assert!(e.contains("train.bin") && e.contains("records"), "{e}");
    let mut bad = records.clone();
    bad[1] = 100;
    std::fs::write(dir.path().join("train.bin"), &bad).unwrap();
    let e = CifarSource::open(dir.path(), Cifar::Hundred, true).err().unwrap().to_string();
    assert!(e.contains("label 100"), "{e}");
    std::fs::write(dir.path().join("train"), cifar_pickle("fine_labels", &fine, &p[..3072 * 3])).unwrap();
    let e = CifarSource::open(dir.path(), Cifar::Hundred, true).err().unwrap().to_string();
    assert!(e.contains("`data` has 9216 bytes for 4 labels"), "{e}");
    std::fs::write(dir.path().join("train"), b"\x80\x02not a pickle").unwrap();
    let e = CifarSource::open(dir.path(), Cifar::Hundred, true).err().unwrap().to_string();
    assert!(e.contains("train") && e.contains("pickle"), "{e}");
    let e = CifarSource::open(&dir.path().join("nowhere"), Cifar::Ten, true).err().unwrap().to_string();
    assert!(e.contains("no CIFAR batches"), "{e}");
}

#[test]
fn reads_are_bounded_to_regular_files_of_capped_size_and_decodes_to_capped_pixels() {
    use crate::{hostile, limits};
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    hostile::fifo(&p("fifo.png")).unwrap();
    hostile::link_to_dev_zero(&p("zero.png")).unwrap();
    hostile::sparse(&p("huge.png"), 300 << 20).unwrap();
    std::fs::write(p("ok.png"), png_bytes(3)).unwrap();
    // A FIFO and a link to a device are refused without a read (neither blocks nor runs forever).
    for f in ["fifo.png", "zero.png"] {
        let e = limits::read_file(&p(f), 1 << 20, "max_image_bytes").unwrap_err();
        assert!(e.contains(f) && e.contains("not a regular file"), "{e}");
    }
    // A file over the cap is refused from its size: nothing allocated or read.
    let e = limits::read_image_file(&p("huge.png")).unwrap_err();
    assert!(e.contains("huge.png") && e.contains("314572800 bytes") && e.contains("data.max_image_bytes"), "{e}");
    let e = limits::read_file(&p("ok.png"), 10, "max_image_bytes").unwrap_err();
    assert!(e.contains("over the cap of 10"), "{e}");
    assert_eq!(limits::read_file(&p("ok.png"), 1 << 20, "max_image_bytes").unwrap(), png_bytes(3));
    // An allocation that cannot succeed is an error, not an abort.
    assert!(limits::buffer(u64::MAX / 2).unwrap_err().contains("cannot allocate"));
    // A 60-byte PNG declaring 100000×100000 pixels is refused from its header.
    let bomb = hostile::png_bomb(100_000, 100_000);
    assert!(bomb.len() < 100);
    let e = crate::rgb::decode(&bomb).unwrap_err();
    assert!(e.contains("10000000000 pixels") && e.contains("data.max_image_pixels"), "{e}");
    assert!(limits::check_pixels(&png_bytes(1), 30).is_ok() && limits::check_pixels(&png_bytes(1), 29).is_err());
    // In an image folder each is a bad sample naming its file.
    std::fs::create_dir(p("c")).unwrap();
    for f in ["fifo.png", "zero.png", "huge.png", "ok.png"] {
        std::fs::rename(p(f), p("c").join(f)).unwrap();
    }
    std::fs::write(p("c/bomb.png"), &bomb).unwrap();
    let s = ImageFolder::open(dir.path()).unwrap();
    let errors: Vec<String> = (0..s.len()).filter_map(|i| s.fetch(i).err()).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    let bomb = (0..s.len()).find(|&i| s.locate(i).ends_with("bomb.png")).unwrap();
    assert!(crate::rgb::decode(&s.fetch(bomb).unwrap().bytes).is_err());
}

#[test]
fn shard_members_over_the_cap_are_refused_from_the_tar_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("000000.tar");
    write_tar(&path, &[("a.png", &vec![7u8; 3 << 20]), ("a.txt", &[b'x'; 64])]);
    let members = super::webdataset::load_or_build_index(&path, None).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let e = super::webdataset::read_span(&mut f, members[0].image, 1 << 20, "max_image_bytes").unwrap_err();
    assert!(e.contains("3145728 bytes") && e.contains("data.max_image_bytes"), "{e}");
    let text = members[0].text.unwrap();
    assert!(super::webdataset::read_span(&mut f, text, 16, "max_text_bytes").unwrap_err().contains("max_text_bytes"));
    assert_eq!(super::webdataset::read_span(&mut f, text, 64, "max_text_bytes").unwrap(), vec![b'x'; 64]);
    // A shard that is not a regular file is refused at open, naming it.
    let fifo = dir.path().join("000001.tar");
    crate::hostile::fifo(&fifo).unwrap();
    let e = WebDataset::open(fifo.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("000001.tar") && e.contains("not a regular file"), "{e}");
}

#[test]
fn shard_specs_expand_as_open_clip_writes_them() {
    let e = |p: &str| expand_braces(p).unwrap();
    assert_eq!(e("s-{a,b}.tar"), ["s-a.tar", "s-b.tar"]);
    assert_eq!(
        e("{x,y{0..1}}/{00..01}.tar"),
        ["x/00.tar", "x/01.tar", "y0/00.tar", "y0/01.tar", "y1/00.tar", "y1/01.tar"]
    );
    assert_eq!(e("{a,{b,c}d}"), ["a", "bd", "cd"]);
    assert_eq!(e("one/{0..1}.tar::two/{5..6}.tar"), ["one/0.tar", "one/1.tar", "two/5.tar", "two/6.tar"]);
    assert_eq!(e("{,pre-}x"), ["x", "pre-x"]);
    assert_eq!(e("plain.tar"), ["plain.tar"]);
    for (bad, says) in [
        ("s{a,b.tar", "unclosed brace in `s{a,b.tar`"),
        ("s}.tar", "without its `{`"),
        ("s{abc}.tar", "expected {a..b} or {x,y}"),
        ("ok.tar::s{3..1}.tar", "empty range {3..1} in `s{3..1}.tar`"),
        (&format!("{}a{}", "{a,".repeat(40), "}".repeat(40)), "nested deeper than 32"),
    ] {
        let err = expand_braces(bad).unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn an_index_dir_holds_the_caches_of_shards_on_a_read_only_mount() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    for (d, key) in [(&one, "a"), (&two, "b")] {
        std::fs::create_dir_all(d).unwrap();
        write_shard(&d.join("0.tar"), &[(key, 1, Some(key), Some(1))]);
    }
    let index = dir.path().join("cache/indexes");
    let pattern = format!("{}/{{one,two}}/0.tar", dir.path().display());
    let ds = WebDataset::open_indexed(&pattern, Some(&index)).unwrap();
    assert_eq!((ds.len(), ds.caption(1).as_deref()), (2, Some("b")));
    // Nothing is written beside the shards; the two `0.tar` have a cache each.
    assert!(!one.join("0.tar.contrast-index").exists() && !two.join("0.tar.contrast-index").exists());
    let mut cached: Vec<String> =
        std::fs::read_dir(&index).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    cached.sort();
    assert_eq!(cached.len(), 2, "{cached:?}");
    assert!(cached.iter().all(|n| n.ends_with("-0.tar.contrast-index")), "{cached:?}");
    // Read back from the caches: a cache that lies is believed only while its checksum holds.
    let again = WebDataset::open_indexed(&pattern, Some(&index)).unwrap();
    assert_eq!(again.samples, ds.samples);
}
