//! RPC record marking over TCP (RFC 5531 §11), read defensively: each record is a run of
//! fragments, each behind a 4-byte header (the top bit marks the last one, the other 31 bits
//! give its length). A header is only a claim: the buffer grows with the bytes that actually
//! arrive, never with the claim, and a record is refused as soon as it would pass the limits,
//! before any of its data is read.

use tokio::io::{AsyncRead, AsyncReadExt};

const LAST: u32 = 0x8000_0000;
/// Read at most this much at a time, so memory follows the bytes received.
const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most bytes of data in one record, all fragments together.
    pub max_record: usize,
    /// The most fragments in one record (empty ones count too).
    pub max_fragments: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RecordError {
    /// A fragment header claims more than the record may hold.
    TooLarge {
        claimed: u64,
    },
    TooManyFragments,
    /// The stream ended inside a record.
    Truncated,
    Io(std::io::ErrorKind),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::TooLarge { claimed } => {
                write!(f, "a record of {claimed} bytes or more (too large)")
            }
            RecordError::TooManyFragments => write!(f, "a record of too many fragments"),
            RecordError::Truncated => write!(f, "the connection ended inside a record"),
            RecordError::Io(kind) => write!(f, "reading: {kind}"),
        }
    }
}

/// Reads up to `buf.len()` bytes, fewer only at the end of the stream.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, RecordError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RecordError::Io(e.kind())),
        }
    }
    Ok(got)
}

/// Reads the next record's data into `out` (cleared first). `Ok(false)` is a clean end of the
/// stream between records.
pub async fn read_record<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Result<bool, RecordError> {
    out.clear();
    let mut fragments = 0;
    loop {
        let mut header = [0u8; 4];
        match read_full(r, &mut header).await? {
            4 => {}
            0 if fragments == 0 => return Ok(false),
            _ => return Err(RecordError::Truncated),
        }
        let header = u32::from_be_bytes(header);
        let len = (header & !LAST) as usize;
        fragments += 1;
        if fragments > limits.max_fragments {
            return Err(RecordError::TooManyFragments);
        }
        if out.len() + len > limits.max_record {
            return Err(RecordError::TooLarge {
                claimed: (out.len() + len) as u64,
            });
        }
        let mut left = len;
        while left > 0 {
            let start = out.len();
            let want = left.min(CHUNK);
            out.resize(start + want, 0);
            let n = read_full(r, &mut out[start..]).await?;
            if n < want {
                out.truncate(start + n);
                return Err(RecordError::Truncated);
            }
            left -= n;
        }
        if header & LAST != 0 {
            return Ok(true);
        }
    }
}

/// `data` as one record of one fragment.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&(data.len() as u32 | LAST).to_be_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_record: 1024,
        max_fragments: 8,
    };

    fn run(input: &[u8], limits: &Limits) -> Vec<Result<Vec<u8>, RecordError>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = input;
            let mut out = Vec::new();
            let mut records = Vec::new();
            loop {
                match read_record(&mut r, limits, &mut out).await {
                    Ok(true) => {
                        assert!(out.capacity() <= 2 * (limits.max_record + CHUNK));
                        records.push(Ok(out.clone()))
                    }
                    Ok(false) => return records,
                    Err(e) => {
                        records.push(Err(e));
                        return records;
                    }
                }
            }
        })
    }

    fn fragments(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let last = if i + 1 == parts.len() { LAST } else { 0 };
            out.extend_from_slice(&(p.len() as u32 | last).to_be_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn records_and_fragments_are_joined() {
        let mut input = fragments(&[b"ab", b"", b"cd"]);
        input.extend(frame(b"xyz"));
        assert_eq!(
            run(&input, &LIMITS),
            vec![Ok(b"abcd".to_vec()), Ok(b"xyz".to_vec())]
        );
        assert_eq!(run(b"", &LIMITS), vec![]);
    }

    #[test]
    fn a_huge_claim_is_refused_before_any_data() {
        // 2 GiB claimed by a 4-byte header: refused at once, nothing allocated for it.
        let input = 0xffff_ffffu32.to_be_bytes();
        assert_eq!(
            run(&input, &LIMITS),
            vec![Err(RecordError::TooLarge {
                claimed: 0x7fff_ffff
            })]
        );
        // Fragments that add up past the limit.
        let big = vec![0u8; 600];
        assert!(matches!(
            run(&fragments(&[&big, &big]), &LIMITS)[..],
            [Err(RecordError::TooLarge { claimed: 1200 })]
        ));
    }

    #[test]
    fn endless_empty_fragments_are_refused() {
        let input: Vec<u8> = std::iter::repeat_n(0u32.to_be_bytes(), 100)
            .flatten()
            .collect();
        assert_eq!(
            run(&input, &LIMITS),
            vec![Err(RecordError::TooManyFragments)]
        );
    }

    #[test]
    fn a_hang_up_inside_a_record_is_truncated() {
        let whole = frame(b"hello");
        for cut in 1..whole.len() {
            assert_eq!(
                run(&whole[..cut], &LIMITS),
                vec![Err(RecordError::Truncated)],
                "cut at {cut}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic_or_pass_the_limits(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
            for r in run(&input, &LIMITS).into_iter().flatten() {
                prop_assert!(r.len() <= LIMITS.max_record);
            }
        }

        #[test]
        fn well_formed_records_round_trip(
            records in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..6),
                0..6,
            )
        ) {
            let mut input = Vec::new();
            for parts in &records {
                let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
                input.extend(fragments(&refs));
            }
            let got = run(&input, &LIMITS);
            let want: Vec<Result<Vec<u8>, RecordError>> =
                records.iter().map(|parts| Ok(parts.concat())).collect();
            prop_assert_eq!(got, want);
        }
    }
}
