//! Real output files: PNG, APNG, animated WEBP, MP4 and FLAC, padded with format-legal
//! filler (a private PNG chunk, an unknown RIFF chunk, an ISO-BMFF `free` box, FLAC
//! PADDING blocks) up to a requested size, written to disk in 1 MiB pieces.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::OnceLock;

const WEBP: &[u8] = include_bytes!("../fixtures/sim.webp");
const MP4: &[u8] = include_bytes!("../fixtures/sim.mp4");
const FLAC: &[u8] = include_bytes!("../fixtures/sim.flac");
const JPEG: &[u8] = include_bytes!("../fixtures/preview.jpg");
const PIECE: usize = 1 << 20;

fn crc_table() -> &'static [u32; 256] {
    static T: OnceLock<[u32; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0u32; 256];
        for (n, slot) in t.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    })
}

fn crc_update(mut crc: u32, data: &[u8]) -> u32 {
    let t = crc_table();
    for b in data {
        crc = t[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn write_zeros(w: &mut impl Write, mut n: u64, mut crc: Option<&mut u32>) -> std::io::Result<()> {
    let zeros = vec![0u8; PIECE];
    while n > 0 {
        let k = n.min(PIECE as u64) as usize;
        w.write_all(&zeros[..k])?;
        if let Some(c) = crc.as_deref_mut() {
            *c = crc_update(*c, &zeros[..k]);
        }
        n -= k as u64;
    }
    Ok(())
}

/// Solid-colour frames described by size and `0xRRGGBB` colour.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    pub width: u32,
    pub height: u32,
    pub color: u32,
}

fn encode_png(frames: &[Frame], fps: f64, text: Option<&str>) -> Result<Vec<u8>, String> {
    let first = frames.first().ok_or("no frames")?;
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, first.width.max(1), first.height.max(1));
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        if let Some(t) = text {
            enc.add_text_chunk("prompt".to_owned(), t.to_owned())
                .map_err(|e| e.to_string())?;
        }
        if frames.len() > 1 {
            enc.set_animated(frames.len() as u32, 0)
                .map_err(|e| e.to_string())?;
            let den = 1000u16;
            let num = ((1000.0 / fps.max(0.01)).round() as u64).min(u64::from(u16::MAX)) as u16;
            enc.set_frame_delay(num, den).map_err(|e| e.to_string())?;
        }
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        for f in frames {
            let (w_px, h_px) = (first.width.max(1) as usize, first.height.max(1) as usize);
            let px = [(f.color >> 16) as u8, (f.color >> 8) as u8, f.color as u8];
            let mut stream = w.stream_writer().map_err(|e| e.to_string())?;
            let row: Vec<u8> = px.iter().copied().cycle().take(w_px * 3).collect();
            for _ in 0..h_px {
                stream.write_all(&row).map_err(|e| e.to_string())?;
            }
            stream.finish().map_err(|e| e.to_string())?;
        }
        w.finish().map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

fn pad_png(path: &Path, bytes: &[u8], target: u64) -> std::io::Result<()> {
    let mut f = BufWriter::with_capacity(PIECE, File::create(path)?);
    let (head, iend) = bytes.split_at(bytes.len().saturating_sub(12));
    f.write_all(head)?;
    let mut missing = target.saturating_sub(bytes.len() as u64);
    while missing >= 12 {
        let len = (missing - 12).min(0x7fff_ffff);
        f.write_all(&(len as u32).to_be_bytes())?;
        let mut crc = crc_update(0xffff_ffff, b"siMp");
        f.write_all(b"siMp")?;
        write_zeros(&mut f, len, Some(&mut crc))?;
        f.write_all(&(crc ^ 0xffff_ffff).to_be_bytes())?;
        missing -= len + 12;
    }
    f.write_all(iend)?;
    f.flush()
}

/// A PNG (one frame) or APNG (several), at least `target` bytes.
pub(crate) fn write_png(
    path: &Path,
    frames: &[Frame],
    fps: f64,
    text: Option<&str>,
    target: u64,
) -> Result<(), String> {
    let bytes = encode_png(frames, fps, text)?;
    pad_png(path, &bytes, target).map_err(|e| e.to_string())
}

/// Animated WEBP (VP8X + ANIM + ANMF/VP8L frames), padded with an unknown chunk.
pub(crate) fn write_webp(path: &Path, target: u64) -> std::io::Result<()> {
    let mut f = BufWriter::with_capacity(PIECE, File::create(path)?);
    let base = WEBP.len() as u64;
    let pad = if target > base + 8 {
        (target - base - 8).min(u64::from(u32::MAX) - base - 16)
    } else {
        0
    };
    let odd = pad % 2;
    let riff = if target > base + 8 {
        base - 8 + 8 + pad + odd
    } else {
        base - 8
    };
    f.write_all(&WEBP[..4])?;
    f.write_all(&(riff as u32).to_le_bytes())?;
    f.write_all(&WEBP[8..])?;
    if target > base + 8 {
        f.write_all(b"PADD")?;
        f.write_all(&(pad as u32).to_le_bytes())?;
        write_zeros(&mut f, pad + odd, None)?;
    }
    f.flush()
}

/// MP4 (ftyp, moov, mdat), padded with a trailing `free` box.
pub(crate) fn write_mp4(path: &Path, target: u64) -> std::io::Result<()> {
    let mut f = BufWriter::with_capacity(PIECE, File::create(path)?);
    f.write_all(MP4)?;
    let base = MP4.len() as u64;
    if target >= base + 16 {
        let size = target - base;
        if size <= u64::from(u32::MAX) {
            f.write_all(&(size as u32).to_be_bytes())?;
            f.write_all(b"free")?;
            write_zeros(&mut f, size - 8, None)?;
        } else {
            f.write_all(&1u32.to_be_bytes())?;
            f.write_all(b"free")?;
            f.write_all(&size.to_be_bytes())?;
            write_zeros(&mut f, size - 16, None)?;
        }
    }
    f.flush()
}

/// FLAC, padded with PADDING metadata blocks.
pub(crate) fn write_flac(path: &Path, target: u64) -> std::io::Result<()> {
    let mut f = BufWriter::with_capacity(PIECE, File::create(path)?);
    let bad = || std::io::Error::other("flac fixture is malformed");
    if FLAC.get(..4) != Some(b"fLaC") {
        return Err(bad());
    }
    // Walk metadata blocks to find the last one.
    let mut pos = 4usize;
    let last_hdr;
    loop {
        let hdr = *FLAC.get(pos).ok_or_else(bad)?;
        let len = FLAC.get(pos + 1..pos + 4).ok_or_else(bad)?;
        let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
        if hdr & 0x80 != 0 {
            last_hdr = pos;
            pos += 4 + len;
            break;
        }
        pos += 4 + len;
    }
    let base = FLAC.len() as u64;
    let mut missing = target.saturating_sub(base);
    if missing < 4 {
        f.write_all(FLAC)?;
        return f.flush();
    }
    f.write_all(&FLAC[..last_hdr])?;
    f.write_all(&[FLAC[last_hdr] & 0x7f])?;
    f.write_all(&FLAC[last_hdr + 1..pos])?;
    const MAX: u64 = 0xff_ffff;
    while missing >= 4 {
        let len = (missing - 4).min(MAX);
        missing -= len + 4;
        let last = missing < 4;
        f.write_all(&[if last { 0x81 } else { 0x01 }])?;
        f.write_all(&(len as u32).to_be_bytes()[1..])?;
        write_zeros(&mut f, len, None)?;
    }
    f.write_all(&FLAC[pos..])?;
    f.flush()
}

/// A JPEG preview image.
pub(crate) fn preview_jpeg() -> &'static [u8] {
    JPEG
}

/// A PNG preview image.
pub(crate) fn preview_png() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        encode_png(
            &[Frame {
                width: 64,
                height: 64,
                color: 0x336699,
            }],
            1.0,
            None,
        )
        .unwrap_or_default()
    })
}

/// Width and height from a PNG header, if the file is one.
pub(crate) fn png_size(path: &Path) -> Option<(u32, u32)> {
    let f = File::open(path).ok()?;
    let dec = png::Decoder::new(std::io::BufReader::new(f));
    let r = dec.read_info().ok()?;
    let info = r.info();
    Some((info.width, info.height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_files_have_the_requested_size_and_stay_valid() {
        let d = tempfile::tempdir().expect("tmp");
        let frame = Frame {
            width: 16,
            height: 8,
            color: 0xff0000,
        };
        let p = d.path().join("a.png");
        write_png(&p, &[frame], 1.0, Some("{}"), 100_000).expect("png");
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 100_000);
        assert_eq!(png_size(&p), Some((16, 8)));
        let mut dec = png::Decoder::new(std::io::BufReader::new(File::open(&p).expect("open")))
            .read_info()
            .expect("info");
        let mut buf = vec![0; dec.output_buffer_size().expect("size")];
        dec.next_frame(&mut buf)
            .expect("decodes with the padding chunk");

        let p = d.path().join("a.apng");
        write_png(&p, &[frame, frame, frame], 4.0, None, 0).expect("apng");
        let dec = png::Decoder::new(std::io::BufReader::new(File::open(&p).expect("open")))
            .read_info()
            .expect("info");
        assert_eq!(
            dec.info().animation_control().map(|a| a.num_frames),
            Some(3)
        );

        let p = d.path().join("a.webp");
        write_webp(&p, 10_001).expect("webp");
        let b = std::fs::read(&p).expect("read");
        assert_eq!(&b[8..16], b"WEBPVP8X");
        assert_eq!(
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize,
            b.len() - 8
        );

        let p = d.path().join("a.mp4");
        write_mp4(&p, 50_000).expect("mp4");
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 50_000);

        let p = d.path().join("a.flac");
        write_flac(&p, 40_000_000).expect("flac");
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 40_000_000);
    }
}
