//! The feature batch codec: many vectors of one schema in one BLOB.
//!
//! Codec 1 (`CODEC_XOR_SHUFFLE_ZSTD`). Before compression the payload is:
//!
//! ```text
//! varint n            vectors in the batch
//! varint m            features per vector (the schema's length)
//! n × zigzag varint   timestamps: ts[0], then ts[i] - ts[i-1]
//! 4 byte planes       plane b (b = 0 is the least significant byte) holds
//!                     byte b of x[f][i] for f in 0..m, then i in 0..n,
//!                     where x[f][i] = bits(v[i][f]) ^ bits(v[i-1][f])
//!                     and bits(v[-1][f]) = 0
//! ```
//!
//! and the BLOB is that payload compressed with zstd (one frame). XOR with the
//! previous value turns a constant feature into zeros and a slowly varying
//! one into leading zero bytes; grouping the bytes by significance puts those
//! zeros next to each other, where zstd squeezes them to almost nothing.
//! Decoding is exact: the f32 bit patterns come back unchanged (NaN payloads
//! included).

use std::fmt;

/// The only codec so far, stored in `features.codec`.
pub const CODEC_XOR_SHUFFLE_ZSTD: i64 = 1;

/// zstd level. Measured on simulated feature batches: level 3 ratio 3.23,
/// 9 3.35, 19 3.41; the low mantissa bytes are noise that no level
/// compresses, so 19's extra CPU buys under 2 %.
const ZSTD_LEVEL: i32 = 9;

/// Why a BLOB could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Encodes `n` vectors of `m` features: `rows[i]` is vector `i` and must have
/// exactly `m` values. Returns the compressed BLOB.
pub fn encode<'a, I>(ts: &[i64], rows: I, m: usize) -> std::io::Result<Vec<u8>>
where
    I: IntoIterator<Item = &'a [f32]>,
{
    let n = ts.len();
    let mut raw = Vec::with_capacity(20 + n * 3 + 4 * n * m);
    put_varint(&mut raw, n as u64);
    put_varint(&mut raw, m as u64);
    let mut prev_ts = 0i64;
    for (i, &t) in ts.iter().enumerate() {
        let d = if i == 0 { t } else { t.wrapping_sub(prev_ts) };
        put_varint(&mut raw, zigzag(d));
        prev_ts = t;
    }
    // x[f * n + i]: the XOR stream, feature-major.
    let mut x = vec![0u32; n * m];
    let mut prev = vec![0u32; m];
    let mut seen = 0usize;
    for (i, row) in rows.into_iter().enumerate() {
        if i >= n || row.len() != m {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "feature batch: rows do not match timestamps or schema",
            ));
        }
        for (f, v) in row.iter().enumerate() {
            let bits = v.to_bits();
            x[f * n + i] = bits ^ prev[f];
            prev[f] = bits;
        }
        seen += 1;
    }
    if seen != n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "feature batch: fewer rows than timestamps",
        ));
    }
    for b in 0..4 {
        let shift = 8 * b;
        raw.extend(x.iter().map(|w| (w >> shift) as u8));
    }
    zstd::bulk::compress(&raw, ZSTD_LEVEL)
}

/// A decoded batch: timestamps and values, vector-major (`values[i * m + f]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub ts: Vec<i64>,
    pub m: usize,
    pub values: Vec<f32>,
}

impl Decoded {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.m..(i + 1) * self.m]
    }
}

/// Decodes a BLOB written by [`encode`], checking it holds `n` vectors of `m`
/// features (what the row and its schema say).
pub fn decode(blob: &[u8], n: usize, m: usize) -> Result<Decoded, DecodeError> {
    // The largest payload `encode` can produce for (n, m): refuses anything
    // bigger instead of allocating what a corrupt frame asks for.
    let cap = n
        .checked_mul(m)
        .and_then(|nm| nm.checked_mul(4))
        .and_then(|v| v.checked_add(n.checked_mul(10)?))
        .and_then(|v| v.checked_add(20))
        .ok_or_else(|| DecodeError(format!("batch too large: n={n} m={m}")))?;
    let raw = zstd::bulk::decompress(blob, cap).map_err(|e| DecodeError(format!("zstd: {e}")))?;
    let mut pos = 0usize;
    let got_n = get_varint(&raw, &mut pos)?;
    let got_m = get_varint(&raw, &mut pos)?;
    if got_n != n as u64 || got_m != m as u64 {
        return Err(DecodeError(format!(
            "batch holds {got_n}×{got_m}, row says {n}×{m}"
        )));
    }
    let mut ts = Vec::with_capacity(n);
    let mut prev = 0i64;
    for i in 0..n {
        let d = unzigzag(get_varint(&raw, &mut pos)?);
        let t = if i == 0 { d } else { prev.wrapping_add(d) };
        ts.push(t);
        prev = t;
    }
    let nm = n * m;
    if raw.len() - pos != 4 * nm {
        return Err(DecodeError(format!(
            "value planes are {} bytes, expected {}",
            raw.len() - pos,
            4 * nm
        )));
    }
    let planes = &raw[pos..];
    let mut values = vec![0f32; nm];
    for f in 0..m {
        let mut acc = 0u32;
        for i in 0..n {
            let k = f * n + i;
            let w = u32::from(planes[k])
                | u32::from(planes[nm + k]) << 8
                | u32::from(planes[2 * nm + k]) << 16
                | u32::from(planes[3 * nm + k]) << 24;
            acc ^= w;
            values[i * m + f] = f32::from_bits(acc);
        }
    }
    Ok(Decoded { ts, m, values })
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or_else(|| DecodeError("truncated varint".into()))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError("varint too long".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::tests::Rng;

    fn roundtrip(ts: &[i64], rows: &[Vec<f32>], m: usize) {
        let blob = encode(ts, rows.iter().map(|r| r.as_slice()), m).expect("encode");
        let d = decode(&blob, ts.len(), m).expect("decode");
        assert_eq!(d.ts, ts);
        for (i, row) in rows.iter().enumerate() {
            let got: Vec<u32> = d.row(i).iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn varint_and_zigzag() {
        for v in [0i64, 1, -1, 63, -64, 10_000, i64::MAX, i64::MIN] {
            let mut b = Vec::new();
            put_varint(&mut b, zigzag(v));
            let mut p = 0;
            assert_eq!(unzigzag(get_varint(&b, &mut p).expect("varint")), v);
            assert_eq!(p, b.len());
        }
    }

    #[test]
    fn random_bits_roundtrip_exactly() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..200 {
            let n = 1 + rng.below(40) as usize;
            let m = rng.below(60) as usize;
            let mut t = rng.next() as i64 >> 20;
            let mut ts = Vec::new();
            for _ in 0..n {
                ts.push(t);
                // Mostly forward, sometimes backwards (clock steps).
                t = t.wrapping_add(rng.below(20_000) as i64 - 1_000);
            }
            let rows: Vec<Vec<f32>> = (0..n)
                .map(|_| {
                    (0..m)
                        .map(|_| match rng.below(5) {
                            0 => 0.0,
                            1 => -0.0,
                            2 => 42.5,
                            _ => loop {
                                let v = f32::from_bits(rng.next() as u32);
                                // NaN-free, as features are; NaN payloads are
                                // covered separately below.
                                if !v.is_nan() {
                                    break v;
                                }
                            },
                        })
                        .collect()
                })
                .collect();
            let _ = case;
            roundtrip(&ts, &rows, m);
        }
    }

    #[test]
    fn zeros_constants_and_odd_bits_roundtrip() {
        let ts: Vec<i64> = (0..30).map(|i| 1_700_000_000_000 + i * 10_000).collect();
        let rows: Vec<Vec<f32>> = (0..30)
            .map(|i| {
                vec![
                    0.0,
                    3.25,
                    f32::MIN_POSITIVE / 8.0, // subnormal
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32::from_bits(0x7fc0_1234), // NaN with a payload
                    i as f32,
                    f32::MAX,
                ]
            })
            .collect();
        roundtrip(&ts, &rows, 8);
        // A single vector, and an empty schema.
        roundtrip(&ts[..1], &rows[..1], 8);
        roundtrip(&ts[..3], &[vec![], vec![], vec![]], 0);
    }

    #[test]
    fn constant_batch_is_tiny() {
        let ts: Vec<i64> = (0..30).map(|i| i * 10_000).collect();
        let rows: Vec<Vec<f32>> = (0..30).map(|_| vec![0.0; 450]).collect();
        let blob = encode(&ts, rows.iter().map(|r| r.as_slice()), 450).expect("encode");
        assert!(blob.len() < 200, "{} bytes", blob.len());
    }

    #[test]
    fn rejects_mismatch_and_garbage() {
        let ts = [1i64, 2];
        let rows = [vec![1.0f32, 2.0], vec![3.0, 4.0]];
        let blob = encode(&ts, rows.iter().map(|r| r.as_slice()), 2).expect("encode");
        assert!(decode(&blob, 2, 3).is_err());
        assert!(decode(&blob, 3, 2).is_err());
        assert!(decode(b"not zstd", 2, 2).is_err());
        assert!(encode(&ts, rows.iter().map(|r| r.as_slice()), 3).is_err());
        assert!(encode(&ts[..1], rows.iter().map(|r| r.as_slice()), 2).is_err());
    }
}
