//! Bad inputs for both binaries: each fails with exit code 1 and a one-paragraph error, never
//! a panic or a backtrace; hostile images are refused with the right code and bounded memory.

use std::path::Path;
use std::process::Command;

use edge_e2e::{
    assert_clean_failure, bin, jpeg_with_declared_size, png_bomb, rewrite_manifest, run, shared_models,
    stderr, stdout,
};
use serde_json::Value;

use crate::classify_photos::efficientnet_bundle;

fn convert(source: &Path, extra: &[&str]) -> std::process::Output {
    let out = tempfile::tempdir().unwrap();
    run(Command::new(bin("edge-convert"))
        .arg("convert")
        .arg(source)
        .arg("-o")
        .arg(out.path().join("out.bundle"))
        .args(extra))
}

#[test]
fn convert_rejects_missing_empty_garbage_and_truncated_models() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let onnx = std::fs::read(shared_models().join("efficientnet_lite0.onnx")).unwrap();
    std::fs::write(d.join("empty.onnx"), b"").unwrap();
    std::fs::write(
        d.join("garbage.onnx"),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    std::fs::write(d.join("truncated.onnx"), &onnx[..onnx.len() / 2]).unwrap();
    std::fs::write(d.join("head.onnx"), &onnx[..200]).unwrap();
    std::fs::write(d.join("notes.txt"), b"this is not a model\n").unwrap();
    std::fs::write(
        d.join("photo.pb"),
        std::fs::read(shared_models().join("coffee.jpg")).unwrap(),
    )
    .unwrap();
    std::fs::write(d.join("garbage.pb"), [0x0a, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]).unwrap();
    std::fs::create_dir(d.join("empty_saved_model")).unwrap();
    let cases = [
        ("missing", d.join("nope.onnx")),
        ("empty", d.join("empty.onnx")),
        ("garbage", d.join("garbage.onnx")),
        ("truncated", d.join("truncated.onnx")),
        ("header only", d.join("head.onnx")),
        ("text file", d.join("notes.txt")),
        ("JPEG named .pb", d.join("photo.pb")),
        ("garbage GraphDef", d.join("garbage.pb")),
        ("empty SavedModel dir", d.join("empty_saved_model")),
    ];
    for (what, path) in cases {
        let out = convert(&path, &["--preset", "efficientnet-lite"]);
        let err = assert_clean_failure(&out, what);
        assert!(
            err.lines().filter(|l| !l.trim().is_empty()).count() <= 6,
            "{what}: error is not one paragraph:\n{err}"
        );
        println!("{what}: {}", err.trim());
    }
}

#[test]
fn convert_rejects_mismatched_labels_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("ten.txt");
    std::fs::write(
        &labels,
        (0..10).map(|i| format!("class {i}\n")).collect::<String>(),
    )
    .unwrap();
    let model = shared_models().join("efficientnet_lite0.onnx");
    let out = convert(&model, &["--labels", labels.to_str().unwrap()]);
    let err = assert_clean_failure(&out, "10 labels for 1000 classes");
    assert!(err.contains("10 labels"), "{err}");
    let out = convert(&model, &["--input-shape", "1,3,300,300"]);
    let err = assert_clean_failure(&out, "shape conflicting with the model");
    assert!(err.contains("conflicts"), "{err}");
    let out = convert(&model, &["--mean", "1,2"]);
    assert_clean_failure(&out, "two means");
}

#[test]
fn agent_rejects_bad_bundles_clearly() {
    let good = efficientnet_bundle();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(d.join("truncated.bundle"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(d.join("garbage.bundle"), vec![0x5a; 10_000]).unwrap();
    std::fs::write(d.join("empty.bundle"), b"").unwrap();
    rewrite_manifest(&good, &d.join("future.bundle"), |m| {
        m["format_version"] = 99.into()
    });
    rewrite_manifest(&good, &d.join("newer-tract.bundle"), |m| {
        m["tract_version"] = "0.99.0".into()
    });
    rewrite_manifest(&good, &d.join("bad-shape.bundle"), |m| {
        m["input"]["shape"] = serde_json::json!([1, 3, 300, 300])
    });
    let photo = shared_models().join("coffee.jpg");
    let cases = [
        ("missing", "nope.bundle", "No such file"),
        ("truncated", "truncated.bundle", ""),
        ("garbage", "garbage.bundle", "not an edge bundle"),
        ("empty", "empty.bundle", "not an edge bundle"),
        ("future format", "future.bundle", "format version 99"),
        ("newer tract", "newer-tract.bundle", "newer than the tract"),
        (
            "manifest disagrees with model",
            "bad-shape.bundle",
            "does not match",
        ),
    ];
    for (what, file, needle) in cases {
        let out = run(Command::new(bin("edge-agent"))
            .args(["classify", "--bundle"])
            .arg(d.join(file))
            .arg(&photo));
        let err = assert_clean_failure(&out, what);
        assert!(err.contains(needle), "{what}: expected {needle:?} in\n{err}");
        println!("{what}: {}", err.trim());
    }
}

/// Encodes an image with the `image` crate.
pub(crate) fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// `rgb` (8-bit RGB pixels) as a JPEG with the given colour type / progressive coding.
pub(crate) fn jpeg(rgb: &image::RgbImage, cmyk: bool, progressive: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 90);
    encoder.set_progressive(progressive);
    let (w, h) = (rgb.width() as u16, rgb.height() as u16);
    if cmyk {
        // Adobe-style inverted CMYK, as Photoshop writes it.
        let data: Vec<u8> = rgb
            .pixels()
            .flat_map(|p| {
                let [r, g, b] = p.0.map(f32::from);
                let k = 255.0 - r.max(g).max(b);
                let f = |c: f32| {
                    if k >= 255.0 {
                        0.0
                    } else {
                        (255.0 - c - k) / (255.0 - k) * 255.0
                    }
                };
                [255.0 - f(r), 255.0 - f(g), 255.0 - f(b), 255.0 - k].map(|v| v.round() as u8)
            })
            .collect();
        encoder
            .encode(&data, w, h, jpeg_encoder::ColorType::Cmyk)
            .unwrap();
    } else {
        encoder
            .encode(rgb.as_raw(), w, h, jpeg_encoder::ColorType::Rgb)
            .unwrap();
    }
    out
}

/// A palette PNG of `rgb` quantised to 6x6x6 colours.
pub(crate) fn palette_png(rgb: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, rgb.width(), rgb.height());
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    let palette: Vec<u8> = (0..216u32)
        .flat_map(|i| [i / 36, i / 6 % 6, i % 6].map(|c| (c * 51) as u8))
        .collect();
    encoder.set_palette(palette);
    let mut writer = encoder.write_header().unwrap();
    let q = |v: u8| (u32::from(v) + 25) / 51;
    let indices: Vec<u8> = rgb
        .pixels()
        .map(|p| (q(p.0[0]) * 36 + q(p.0[1]) * 6 + q(p.0[2])) as u8)
        .collect();
    writer.write_image_data(&indices).unwrap();
    drop(writer);
    out
}

#[test]
fn classify_handles_image_variants_and_refuses_hostile_ones() {
    let bundle = efficientnet_bundle();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coffee = std::fs::read(shared_models().join("coffee.jpg")).unwrap();
    let rgb = image::load_from_memory(&coffee).unwrap();
    let files: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "grey.png",
            encode(
                image::DynamicImage::ImageLuma8(rgb.to_luma8()),
                image::ImageFormat::Png,
            ),
            None,
        ),
        (
            "rgba.png",
            encode(
                image::DynamicImage::ImageRgba8(rgb.to_rgba8()),
                image::ImageFormat::Png,
            ),
            None,
        ),
        (
            "rgb16.png",
            encode(
                image::DynamicImage::ImageRgb16(rgb.to_rgb16()),
                image::ImageFormat::Png,
            ),
            None,
        ),
        (
            "grey.jpg",
            encode(
                image::DynamicImage::ImageLuma8(rgb.to_luma8()),
                image::ImageFormat::Jpeg,
            ),
            None,
        ),
        ("rgb-cmyk.jpg", jpeg(&rgb.to_rgb8(), true, false), None),
        ("rgb-progressive.jpg", jpeg(&rgb.to_rgb8(), false, true), None),
        ("rgb-palette.png", palette_png(&rgb.to_rgb8()), None),
        ("zero.jpg", Vec::new(), Some("unsupported_format")),
        (
            "garbage.jpg",
            (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            Some("unsupported_format"),
        ),
        (
            "gif.gif",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            Some("unsupported_format"),
        ),
        (
            "truncated.jpg",
            coffee[..coffee.len() / 3].to_vec(),
            Some("invalid_image"),
        ),
        ("header-only.jpg", coffee[..600].to_vec(), Some("invalid_image")),
        ("bomb.png", png_bomb(30_000, 30_000), Some("too_large")),
        ("bomb-pixels.png", png_bomb(16_000, 16_000), Some("too_large")),
        (
            "huge.jpg",
            jpeg_with_declared_size(&coffee, 60_000, 60_000),
            Some("too_large"),
        ),
    ];
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["classify", "--json", "--top-k", "1", "--bundle"])
        .arg(&bundle);
    for (name, bytes, _) in &files {
        std::fs::write(d.join(name), bytes).unwrap();
        cmd.arg(d.join(name));
    }
    let out = run(&mut cmd);
    assert_eq!(
        out.status.code(),
        Some(1),
        "some images must fail:\n{}",
        stderr(&out)
    );
    let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), files.len());
    for ((name, _, expected), result) in files.iter().zip(results) {
        println!("{name}: {result}");
        match expected {
            None => {
                let top = &result["top"][0];
                assert!(
                    top["score"].as_f64().is_some(),
                    "{name} should classify: {result}"
                );
                // The colour variants of the espresso photo are still coffee-ish; grey loses
                // colour, so only the full-colour ones must stay espresso.
                if name.starts_with("rgb") {
                    assert_eq!(top["label"], "espresso", "{name}");
                }
            }
            Some(code) => assert_eq!(result["error"]["code"], *code, "{name}: {result}"),
        }
    }
}

#[test]
fn convert_rejects_broken_saved_models() {
    let original = edge_e2e::fixtures().join("inception_v3_seeded_jpeg/1");
    let dir = tempfile::tempdir().unwrap();
    let pb = std::fs::read(original.join("saved_model.pb")).unwrap();
    let data = original.join("variables/variables.data-00000-of-00001");
    let index = original.join("variables/variables.index");
    // (case, saved_model.pb bytes, variables.index present, variables.data bytes kept)
    let data_len = std::fs::metadata(&data).unwrap().len() as usize;
    let cases = [
        ("truncated saved_model.pb", pb.len() / 2, true, data_len),
        ("truncated variables data", pb.len(), true, data_len / 2),
        ("missing variables index", pb.len(), false, data_len),
    ];
    for (i, (what, pb_len, with_index, data_keep)) in cases.into_iter().enumerate() {
        let model = dir.path().join(format!("m{i}/1"));
        std::fs::create_dir_all(model.join("variables")).unwrap();
        std::fs::write(model.join("saved_model.pb"), &pb[..pb_len]).unwrap();
        if with_index {
            std::os::unix::fs::symlink(&index, model.join("variables/variables.index")).unwrap();
        }
        let target = model.join("variables/variables.data-00000-of-00001");
        if data_keep == data_len {
            std::os::unix::fs::symlink(&data, &target).unwrap();
        } else {
            let bytes = std::fs::read(&data).unwrap();
            std::fs::write(&target, &bytes[..data_keep]).unwrap();
        }
        let out = convert(&model, &[]);
        let err = assert_clean_failure(&out, what);
        println!("{what}: {}", err.trim());
        if !with_index {
            assert!(
                err.contains("variables.index"),
                "{what}: the error should name the missing file\n{err}"
            );
        }
    }
}
