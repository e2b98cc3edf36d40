//! Compressing and decompressing qcow2 compressed clusters.
//!
//! A compressed cluster is stored as a raw deflate stream (`zlib`, no zlib
//! header) or a zstd frame, followed by padding up to a 512-byte boundary.
//! The stored length is only known to sector precision, so trailing input is
//! expected; what must hold is that exactly one cluster comes out.

use super::types::CompressionType;

/// Compresses one cluster. Returns None when the result would not be
/// smaller than `limit` bytes: such clusters are stored uncompressed.
///
/// Deflate uses a 4 KiB window: QEMU inflates with that window size, so a
/// stream using a larger one would not read back there.
pub fn compress(kind: CompressionType, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => {
            use flate2::{Compress, Compression, FlushCompress, Status};
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let mut out = vec![0u8; limit];
            match zstd::bulk::compress_to_buffer(input, &mut out, 0) {
                Ok(n) if n < limit => {
                    out.truncate(n);
                    Some(out)
                }
                _ => None,
            }
        }
    }
}

/// Decompresses `input` into `out`, which must be filled completely.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use libdeflater::{DecompressionError, Decompressor};
    use std::cell::RefCell;
    thread_local! {
        // libdeflate inflates a whole buffer at once, about twice as fast as
        // a streaming inflater; one decompressor per thread is reused.
        static INFLATER: RefCell<Decompressor> = RefCell::new(Decompressor::new());
    }
    let fast = INFLATER.with(|d| d.borrow_mut().deflate_decompress(input, out));
    match fast {
        Ok(n) if n == out.len() => Ok(()),
        Ok(n) => Err(format!(
            "deflate stream ends after {n} bytes, short of the {}-byte cluster",
            out.len()
        )),
        // A stream longer than a cluster: QEMU keeps the first cluster's worth,
        // which only a streaming inflater can do.
        Err(DecompressionError::InsufficientSpace) => inflate_prefix(input, out),
        Err(DecompressionError::BadData) => Err("deflate stream is corrupt".to_string()),
    }
}

/// Inflates until `out` is full, ignoring whatever the stream holds beyond.
fn inflate_prefix(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| format!("deflate stream is corrupt ({e})"))?;
    let produced = d.total_out();
    match status {
        _ if produced == out.len() as u64 => Ok(()),
        Status::StreamEnd => Err(format!(
            "deflate stream ends after {produced} bytes, short of the {}-byte cluster",
            out.len()
        )),
        _ => Err(format!(
            "deflate stream is truncated after {produced} of {} bytes",
            out.len()
        )),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| format!("zstd stream is corrupt ({e})"))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if hint == 0 || (inb.pos(), outb.pos()) == before {
            return Err(format!(
                "zstd stream ends after {} of {} bytes",
                outb.pos(),
                outb.capacity()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_sector_padding_fills_the_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).expect("compress");
        let mut stream = enc.finish().expect("finish");
        stream.resize(stream.len().next_multiple_of(512) + 512, 0xaa);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &stream, &mut out).expect("inflate");
        assert_eq!(out, data);
    }

    #[test]
    fn a_stream_longer_than_the_cluster_yields_its_first_cluster() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 7) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).expect("compress");
        let stream = enc.finish().expect("finish");
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &stream, &mut out).expect("prefix");
        assert_eq!(out, data[..4096]);
    }

    #[test]
    fn short_or_garbage_streams_are_errors() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 100], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
        let small = zstd::bulk::compress(&[7u8; 100], 1).expect("zstd");
        assert!(decompress(CompressionType::Zstd, &small, &mut out).is_err());
    }

    #[test]
    fn zstd_frame_with_trailing_padding_fills_the_cluster() {
        let data = vec![3u8; 65536];
        let mut frame = zstd::bulk::compress(&data, 1).expect("zstd");
        frame.resize(frame.len() + 300, 0);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &frame, &mut out).expect("zstd");
        assert_eq!(out, data);
    }
}
