//! Bounds-checked, typed views of a client's arrays: in its shared-memory segments
//! (mapped), or in its own memory (copied, see [`super::peer`]).
//!
//! Every number here (offsets, lengths, shapes, the contents of index arrays)
//! comes from the client, so all arithmetic is checked and a bad value becomes a
//! [`Failure`], never a panic or an out-of-bounds access.
//!
//! Soundness note: the segments are shared with the client process, which could
//! write to them while a kernel runs. That is the client's own data race on its own
//! data; the daemon only ever reads plain numbers (every bit pattern is a valid
//! f32/f64/i32/i64) and kernels bounds-check every index they read, so the worst
//! outcome is a wrong answer for that misbehaving client.

use super::mapping::{Mapping, SegmentCache};
use super::peer::PeerBuffer;
use crate::error::{Failure, Result};
use crate::kernels::{Float, SparseIndex};
use autozyme_protocol::{ArrayRef, DType, ErrorKind, Location, Matrix};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Element types that may be viewed in shared memory.
///
/// # Safety
/// Implementors must be plain numbers for which every bit pattern is valid.
pub unsafe trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
}
unsafe impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
unsafe impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
unsafe impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
unsafe impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

/// A checked array inside a mapped segment: `len` elements of `dtype` starting
/// `offset` bytes into the mapping, all of it inside the mapping and aligned.
#[derive(Debug)]
pub struct Region {
    backing: Backing,
    offset: usize,
    len: usize,
    dtype: DType,
}

/// Where a region's bytes are while the daemon works on them.
#[derive(Debug)]
enum Backing {
    /// A client segment, mapped (shared with the client).
    Mapped(Arc<Mapping>),
    /// A private copy of the peer's memory (or an output buffer written back to it).
    Peer(PeerBuffer),
}

/// The connected client: who it is, for segment ownership and peer-memory access.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

pub enum FloatSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

pub enum FloatSliceMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

pub enum IndexSlice<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

/// A computation over a CSR matrix's three arrays, generic in their element
/// types; [`visit_csr`] runs it with the types of the arrays at hand (one
/// dispatch for every request, instead of a ladder of matches in each handler).
pub trait CsrVisitor {
    type Out;
    fn visit<P: SparseIndex, I: SparseIndex, T: Float>(
        self,
        indptr: &[P],
        indices: &[I],
        data: &[T],
    ) -> Self::Out;
}

/// Runs `v` on `indptr`, `indices` and `data`, whatever their dtypes.
pub fn visit_csr<V: CsrVisitor>(
    v: V,
    indptr: IndexSlice<'_>,
    indices: IndexSlice<'_>,
    data: FloatSlice<'_>,
) -> V::Out {
    use FloatSlice::{F32, F64};
    use IndexSlice::{I32, I64};
    match (indptr, indices, data) {
        (I32(p), I32(i), F32(d)) => v.visit(p, i, d),
        (I32(p), I32(i), F64(d)) => v.visit(p, i, d),
        (I32(p), I64(i), F32(d)) => v.visit(p, i, d),
        (I32(p), I64(i), F64(d)) => v.visit(p, i, d),
        (I64(p), I32(i), F32(d)) => v.visit(p, i, d),
        (I64(p), I32(i), F64(d)) => v.visit(p, i, d),
        (I64(p), I64(i), F32(d)) => v.visit(p, i, d),
        (I64(p), I64(i), F64(d)) => v.visit(p, i, d),
    }
}

impl Region {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn byte_range(&self) -> Range<usize> {
        self.offset..self.offset + self.len * self.dtype.size()
    }

    /// The same memory in the same place: the same segment file, or the same
    /// peer addresses.
    fn same_place(&self, other: &Region) -> bool {
        match (&self.backing, &other.backing) {
            (Backing::Mapped(a), Backing::Mapped(b)) => a.same_file(b),
            (Backing::Peer(_), Backing::Peer(_)) => true,
            _ => false,
        }
    }

    /// Byte range in the place's own coordinates (segment offsets, or peer addresses).
    fn place_range(&self) -> Range<u64> {
        let r = self.byte_range();
        let base = match &self.backing {
            Backing::Mapped(_) => 0,
            Backing::Peer(buf) => buf.address,
        };
        base + r.start as u64..base + r.end as u64
    }

    pub fn overlaps(&self, other: &Region) -> bool {
        let (a, b) = (self.place_range(), other.place_range());
        self.same_place(other)
            && !a.is_empty()
            && !b.is_empty()
            && a.start < b.end
            && b.start < a.end
    }

    pub fn is_same_array(&self, other: &Region) -> bool {
        self.same_place(other)
            && self.place_range() == other.place_range()
            && self.len == other.len
            && self.dtype == other.dtype
    }

    /// For an output: an error if it overlaps any of the input arrays a kernel
    /// reads while writing it (`what` names each in the message).
    pub fn check_apart(&self, inputs: &[(Option<&Region>, &str)]) -> Result<()> {
        for &(array, what) in inputs {
            if array.is_some_and(|a| self.overlaps(a)) {
                return Err(Failure::bad_request(format!("out overlaps x's {what}")));
            }
        }
        Ok(())
    }

    /// For an output of a kernel that may work in place: whether it is x's
    /// `data` itself (in place); an error if it overlaps `data` only in part.
    pub fn is_in_place_of(&self, data: &Region) -> Result<bool> {
        if self.is_same_array(data) {
            return Ok(true);
        }
        if self.overlaps(data) {
            return Err(Failure::bad_request(
                "out partially overlaps x's data (it may only be exactly x's data)",
            ));
        }
        Ok(false)
    }

    fn base(&self) -> *mut u8 {
        match &self.backing {
            Backing::Mapped(m) => m.base(),
            Backing::Peer(buf) => buf.as_ptr() as *mut u8,
        }
    }

    /// For an output in the peer's memory: write the result back (a no-op for a
    /// mapped segment, which the client already sees).
    pub fn write_back(&mut self, peer: Peer) -> Result<()> {
        match &mut self.backing {
            Backing::Mapped(_) => Ok(()),
            Backing::Peer(buf) => buf.write_to(peer.pid),
        }
    }

    fn slice<T: Element>(&self) -> &[T] {
        assert_eq!(
            T::DTYPE,
            self.dtype,
            "region viewed with the wrong element type"
        );
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the region lies inside the mapping (checked in `Resolver::region`),
        // which the Arc keeps alive for the borrow; the mapping is page-aligned and
        // the offset a multiple of the element size, so the pointer is aligned; every
        // bit pattern is a valid `T` (`Element`). See the module note on sharing.
        unsafe { std::slice::from_raw_parts(self.base().add(self.offset) as *const T, self.len) }
    }

    /// # Safety
    /// No other slice of any region overlapping this one may be alive while the
    /// returned slice is (callers check with [`Region::overlaps`]).
    unsafe fn slice_mut<T: Element>(&mut self) -> &mut [T] {
        assert_eq!(
            T::DTYPE,
            self.dtype,
            "region viewed with the wrong element type"
        );
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `slice`, plus the caller's promise of exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.base().add(self.offset) as *mut T, self.len) }
    }

    /// The region as floats; `None` if it holds integers.
    pub fn floats(&self) -> Option<FloatSlice<'_>> {
        match self.dtype {
            DType::F32 => Some(FloatSlice::F32(self.slice())),
            DType::F64 => Some(FloatSlice::F64(self.slice())),
            DType::I32 | DType::I64 => None,
        }
    }

    /// The region as mutable floats; `None` if it holds integers.
    ///
    /// # Safety
    /// As for [`Region::slice_mut`]: nothing overlapping may be viewed meanwhile.
    pub unsafe fn floats_mut(&mut self) -> Option<FloatSliceMut<'_>> {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self.dtype {
                DType::F32 => Some(FloatSliceMut::F32(self.slice_mut())),
                DType::F64 => Some(FloatSliceMut::F64(self.slice_mut())),
                DType::I32 | DType::I64 => None,
            }
        }
    }

    /// The region as integers; `None` if it holds floats.
    pub fn indices(&self) -> Option<IndexSlice<'_>> {
        match self.dtype {
            DType::I32 => Some(IndexSlice::I32(self.slice())),
            DType::I64 => Some(IndexSlice::I64(self.slice())),
            DType::F32 | DType::F64 => None,
        }
    }
}

/// Resolves the arrays of one request, mapping each distinct segment once.
pub struct Resolver<'c> {
    cache: &'c SegmentCache,
    peer: Peer,
    seen: HashMap<String, Arc<Mapping>>,
}

impl<'c> Resolver<'c> {
    pub fn new(cache: &'c SegmentCache, peer: Peer) -> Self {
        Resolver {
            cache,
            peer,
            seen: HashMap::new(),
        }
    }

    /// An input array: mapped, or copied from the peer's memory.
    pub fn region(&mut self, array: &ArrayRef, what: &str) -> Result<Region> {
        self.resolve(array, what, true)
    }

    /// An output array: mapped, or a private buffer that [`Region::write_back`]
    /// copies into the peer's memory once the kernel is done.
    pub fn output(&mut self, array: &ArrayRef, what: &str) -> Result<Region> {
        self.resolve(array, what, false)
    }

    fn resolve(&mut self, array: &ArrayRef, what: &str, read: bool) -> Result<Region> {
        let itemsize = array.dtype.size() as u64;
        let bytes = array
            .len
            .checked_mul(itemsize)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| {
                Failure::bad_request(format!("{what}: {} elements is too many", array.len))
            })?;
        let (name, offset) = match &array.location {
            Location::Segment { name, offset } => (name, *offset),
            Location::Peer { address } => {
                if !address.is_multiple_of(itemsize) {
                    return Err(Failure::bad_request(format!(
                        "{what}: peer address {address:#x} is not aligned to {itemsize} bytes"
                    )));
                }
                let mut buf = PeerBuffer::new(*address, bytes)?;
                if read {
                    buf.read_from(self.peer.pid)?;
                }
                return Ok(Region {
                    backing: Backing::Peer(buf),
                    offset: 0,
                    len: array.len as usize,
                    dtype: array.dtype,
                });
            }
        };
        let mapping = match self.seen.get(name) {
            Some(m) => Arc::clone(m),
            None => {
                let m = self.cache.get(name, self.peer.uid)?;
                self.seen.insert(name.clone(), Arc::clone(&m));
                m
            }
        };
        if !offset.is_multiple_of(itemsize) {
            return Err(Failure::bad_request(format!(
                "{what}: offset {offset} is not a multiple of the {:?} element size {itemsize}",
                array.dtype
            )));
        }
        match (bytes as u64).checked_add(offset) {
            Some(end) if end <= mapping.len() as u64 => {}
            _ => {
                return Err(Failure::segment(format!(
                    "{what}: {} elements of {:?} at offset {offset} do not fit in segment {name} of {} bytes",
                    array.len,
                    array.dtype,
                    mapping.len()
                )))
            }
        }
        Ok(Region {
            backing: Backing::Mapped(mapping),
            offset: offset as usize,
            len: array.len as usize,
            dtype: array.dtype,
        })
    }
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Failure::bad_matrix(format!("{what} {v} is too large")))
}

/// The three arrays of a CSR matrix, with shapes and dtypes checked.
pub struct CsrRegions {
    pub n_rows: usize,
    pub n_cols: usize,
    pub data: Region,
    /// Absent when the request's kernels do not read column indices.
    pub indices: Option<Region>,
    pub indptr: Region,
}

impl CsrRegions {
    /// Checks dtypes and array lengths (not yet the contents of indptr; see
    /// [`CsrRegions::validate_indptr`]).
    pub fn resolve(
        resolver: &mut Resolver<'_>,
        n_rows: u64,
        n_cols: u64,
        data: &ArrayRef,
        indices: Option<&ArrayRef>,
        indptr: &ArrayRef,
    ) -> Result<Self> {
        check_csr_shape(n_rows, n_cols, data, indices, indptr)?;
        Ok(CsrRegions {
            n_rows: to_usize(n_rows, "n_rows")?,
            n_cols: to_usize(n_cols, "n_cols")?,
            data: resolver.region(data, "CSR data")?,
            indices: match indices {
                Some(i) => Some(resolver.region(i, "CSR indices")?),
                None => None,
            },
            indptr: resolver.region(indptr, "CSR indptr")?,
        })
    }

    /// For kernels that stream the data instead (see `crate::streaming`,
    /// `crate::peer_csr`): the same checks, with only indptr resolved, and its
    /// contents validated. `indices`, for a kernel that streams them too (a
    /// kernel that never reads columns passes none, and 0 columns).
    pub fn resolve_indptr_only(
        resolver: &mut Resolver<'_>,
        n_rows: u64,
        n_cols: u64,
        data: &ArrayRef,
        indices: Option<&ArrayRef>,
        indptr: &ArrayRef,
    ) -> Result<Region> {
        check_csr_shape(n_rows, n_cols, data, indices, indptr)?;
        let region = resolver.region(indptr, "CSR indptr")?;
        let nnz = to_usize(data.len, "CSR data length")?;
        match region.indices().expect("dtype checked") {
            IndexSlice::I32(p) => check_indptr(p, nnz)?,
            IndexSlice::I64(p) => check_indptr(p, nnz)?,
        }
        Ok(region)
    }

    /// indptr starts at 0, never decreases and ends at the stored-value count.
    pub fn validate_indptr(&self) -> Result<()> {
        let nnz = self.data.len();
        match self.indptr.indices().expect("dtype checked in resolve") {
            IndexSlice::I32(p) => check_indptr(p, nnz),
            IndexSlice::I64(p) => check_indptr(p, nnz),
        }
    }

    /// The column indices, present but not checked against `n_cols` (for a kernel
    /// that checks each one as it reads it).
    pub fn column_indices(&self) -> Result<IndexSlice<'_>> {
        Ok(self
            .indices
            .as_ref()
            .ok_or_else(|| Failure::bad_request("this request needs the CSR indices"))?
            .indices()
            .expect("dtype checked in resolve"))
    }

    /// The column indices, for kernels that index by column: present, and every
    /// one in `0..n_cols`.
    pub fn validated_column_indices(&self) -> Result<IndexSlice<'_>> {
        let indices = self.column_indices()?;
        match indices {
            IndexSlice::I32(i) => check_columns(i, self.n_cols)?,
            IndexSlice::I64(i) => check_columns(i, self.n_cols)?,
        }
        Ok(indices)
    }
}

/// Dtypes and lengths of a CSR matrix's arrays (not yet indptr's contents).
fn check_csr_shape(
    n_rows: u64,
    n_cols: u64,
    data: &ArrayRef,
    indices: Option<&ArrayRef>,
    indptr: &ArrayRef,
) -> Result<()> {
    if !matches!(data.dtype, DType::F32 | DType::F64) {
        return Err(Failure::bad_matrix(format!(
            "CSR data must be F32 or F64, not {:?}",
            data.dtype
        )));
    }
    for (array, what) in [(indices, "indices"), (Some(indptr), "indptr")] {
        let Some(array) = array else { continue };
        if !matches!(array.dtype, DType::I32 | DType::I64) {
            return Err(Failure::bad_matrix(format!(
                "CSR {what} must be I32 or I64, not {:?}",
                array.dtype
            )));
        }
    }
    if n_rows.checked_add(1) != Some(indptr.len) {
        return Err(Failure::bad_matrix(format!(
            "CSR indptr has {} elements; n_rows {n_rows} needs n_rows + 1",
            indptr.len
        )));
    }
    if let Some(indices) = indices.filter(|i| i.len != data.len) {
        return Err(Failure::bad_matrix(format!(
            "CSR data has {} elements but indices has {}",
            data.len, indices.len
        )));
    }
    check_unbacked(n_cols, "CSR columns")
}

/// The largest dimension that no array bounds. No real matrix comes near it
/// (2^26 = 67M genes, or cells of an empty matrix); a vector of that many 8-byte
/// entries is 512 MiB.
const UNBACKED_MAX: u64 = 1 << 26;

/// A dimension that no array's length bounds (a CSR matrix's columns; a dense
/// matrix's rows when it has no columns, or its columns when it has no rows)
/// must stay within [`UNBACKED_MAX`] and the daemon's memory budget at 8 bytes
/// an entry: kernels size per-column (per-row) vectors and loops from it, and a
/// forged one would abort the daemon on allocation or keep it busy for days.
fn check_unbacked(n: u64, what: &str) -> Result<()> {
    // Small counts pass without reading the budget (/proc/meminfo).
    if n <= 1 << 20 || (n <= UNBACKED_MAX && n <= (super::peer::budget() / 8) as u64) {
        return Ok(());
    }
    Err(Failure::new(
        ErrorKind::TooLarge,
        format!("{n} {what} exceed what the daemon takes ({UNBACKED_MAX}, and its memory budget)"),
    ))
}

fn check_indptr<P: Copy + Into<i64>>(indptr: &[P], nnz: usize) -> Result<()> {
    let first: i64 = indptr.first().map_or(0, |&v| v.into());
    if first != 0 {
        return Err(Failure::bad_matrix(format!(
            "CSR indptr[0] is {first}, not 0"
        )));
    }
    if let Some(i) = indptr.windows(2).position(|w| w[1].into() < w[0].into()) {
        return Err(Failure::bad_matrix(format!(
            "CSR indptr decreases at row {i}: indptr[{i}] = {}, indptr[{}] = {}",
            indptr[i].into(),
            i + 1,
            indptr[i + 1].into()
        )));
    }
    let last: i64 = indptr.last().map_or(0, |&v| v.into());
    if u64::try_from(last).ok() != Some(nnz as u64) {
        return Err(Failure::bad_matrix(format!(
            "CSR indptr ends at {last} but there are {nnz} stored values"
        )));
    }
    Ok(())
}

/// Elements per parallel scan job; separate jobs let other requests' kernels in
/// between (see `kernels::for_each_in_waves`).
const SCAN_WAVE: usize = 1 << 22;
const SCAN_CHUNK: usize = 1 << 16;

fn check_columns<I: Copy + Into<i64> + Send + Sync>(indices: &[I], n_cols: usize) -> Result<()> {
    let n_cols = n_cols as i64;
    let out_of_range = |c: i64| c < 0 || c >= n_cols;
    // Min and max per chunk: a tight loop the compiler vectorises (an early-exit
    // search such as `position_first` is several times slower on valid data).
    let any_bad = indices.chunks(SCAN_WAVE).any(|slab| {
        let (lo, hi) = slab
            .par_chunks(SCAN_CHUNK)
            .map(|chunk| {
                chunk.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &c| {
                    let c: i64 = c.into();
                    (lo.min(c), hi.max(c))
                })
            })
            .reduce(|| (i64::MAX, i64::MIN), |a, b| (a.0.min(b.0), a.1.max(b.1)));
        out_of_range(lo) || out_of_range(hi)
    });
    if !any_bad {
        return Ok(());
    }
    // Only malformed input gets here: name the first offender.
    match indices.iter().position(|&c| out_of_range(c.into())) {
        Some(j) => Err(Failure::bad_matrix(format!(
            "CSR column index {} at position {j} is outside 0..{n_cols}",
            indices[j].into()
        ))),
        // Rewritten by the client meanwhile; the kernels cope with either.
        None => Ok(()),
    }
}

/// The data array of a C-contiguous dense matrix, with its shape checked.
/// A request's matrix, CSR (with its column indices) or dense, with its arrays
/// resolved and checked against its shape and a CSR indptr validated, before
/// anything is sized from that shape.
pub enum MatrixRegions {
    Csr(CsrRegions),
    Dense(DenseRegions),
}

impl MatrixRegions {
    pub fn resolve(resolver: &mut Resolver<'_>, x: &Matrix) -> Result<Self> {
        match x {
            Matrix::Csr {
                n_rows,
                n_cols,
                data,
                indices,
                indptr,
            } => {
                let indices = indices
                    .as_ref()
                    .ok_or_else(|| Failure::bad_request("this request needs the CSR indices"))?;
                let csr =
                    CsrRegions::resolve(resolver, *n_rows, *n_cols, data, Some(indices), indptr)?;
                csr.validate_indptr()?;
                Ok(MatrixRegions::Csr(csr))
            }
            Matrix::Dense {
                n_rows,
                n_cols,
                data,
            } => Ok(MatrixRegions::Dense(DenseRegions::resolve(
                resolver, *n_rows, *n_cols, data,
            )?)),
        }
    }

    /// (rows, columns)
    pub fn shape(&self) -> (usize, usize) {
        match self {
            MatrixRegions::Csr(m) => (m.n_rows, m.n_cols),
            MatrixRegions::Dense(m) => (m.n_rows, m.n_cols),
        }
    }
}

pub struct DenseRegions {
    pub n_rows: usize,
    pub n_cols: usize,
    pub data: Region,
}

impl DenseRegions {
    pub fn resolve(
        resolver: &mut Resolver<'_>,
        n_rows: u64,
        n_cols: u64,
        data: &ArrayRef,
    ) -> Result<Self> {
        if !matches!(data.dtype, DType::F32 | DType::F64) {
            return Err(Failure::bad_matrix(format!(
                "dense data must be F32 or F64, not {:?}",
                data.dtype
            )));
        }
        if n_rows.checked_mul(n_cols) != Some(data.len) {
            return Err(Failure::bad_matrix(format!(
                "dense data has {} elements but the shape is {n_rows} x {n_cols}",
                data.len
            )));
        }
        if data.len == 0 {
            check_unbacked(
                n_rows.max(n_cols),
                "rows or columns of an empty dense matrix",
            )?;
        }
        Ok(DenseRegions {
            n_rows: to_usize(n_rows, "n_rows")?,
            n_cols: to_usize(n_cols, "n_cols")?,
            data: resolver.region(data, "dense data")?,
        })
    }
}
