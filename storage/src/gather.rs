//! Gathering rows of many batches into one, in a given order: the flush's and compaction's
//! sorted files.
//!
//! `arrow::compute::interleave_record_batch` does the same, but a flush gathers a day's rows
//! of a whole live buffer in (campaign, user_id, ts) order: consecutive rows come from
//! batches all over memory, and every column's read of a row is a cache miss that the
//! core waits out one at a time (arrow's string-view gather alone was ~7% of a loaded
//! server's samples, benches/README.md, session 28). Here each column is gathered with
//! the source of the row [`PREFETCH_AHEAD`] rows on requested early, so the misses
//! overlap. Columns of types other than the event schema's go to arrow's interleave.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, ByteView, MAX_INLINE_VIEW_LEN, NullBufferBuilder, PrimitiveArray,
    RecordBatch, StringViewArray,
};
use arrow::buffer::{Buffer, NullBuffer, ScalarBuffer};
use arrow::compute::interleave;
use arrow::datatypes::{ArrowNativeType, DataType, SchemaRef, TimeUnit, TimestampMicrosecondType};
use arrow::error::ArrowError;

/// How many rows ahead a source value is prefetched: a row takes a few nanoseconds and a
/// miss to memory ~100: with 16 rows ahead the gather was 12% of the flush bench's
/// samples, with 64 it is 7% (benches/README.md, session 28).
const PREFETCH_AHEAD: usize = 64;

/// The rows `(batch, row)` of `batches`, in this order, as one batch with their schema.
pub fn gather_rows(
    batches: &[&RecordBatch],
    rows: &[(usize, usize)],
) -> Result<RecordBatch, ArrowError> {
    RowSources::new(batches)?.gather(rows)
}

/// The columns of many batches, ready to gather rows from, any number of times. What is
/// per source (a type check, a downcast, its nulls) is looked at once here: a flush
/// gathers a file 16 K rows at a time from all of a live buffer's batches (hundreds,
/// one per group commit), and doing it per gather was ~5% of the flusher's samples
/// (comparing column types alone 3%; benches/README.md, session 29).
pub struct RowSources<'a> {
    schema: SchemaRef,
    columns: Vec<ColumnSources<'a>>,
}

/// One column of every batch.
enum ColumnSources<'a> {
    Views {
        views: Vec<&'a [u128]>,
        buffers: Vec<&'a [Buffer]>,
        nulls: SourceNulls<'a>,
    },
    Micros {
        values: Vec<&'a [i64]>,
        data_type: DataType,
        nulls: SourceNulls<'a>,
    },
    /// Other types, and columns whose types differ between batches (files of older
    /// versions, in compaction): arrow's interleave, which says so in its error.
    Other(Vec<&'a dyn Array>),
}

/// Each source's validity, or none when no source has a null.
type SourceNulls<'a> = Option<Vec<Option<&'a NullBuffer>>>;

impl<'a> RowSources<'a> {
    pub fn new(batches: &[&'a RecordBatch]) -> Result<Self, ArrowError> {
        let Some(first) = batches.first() else {
            return Err(ArrowError::InvalidArgumentError(
                "gathering rows needs at least one batch".into(),
            ));
        };
        let schema = first.schema();
        let columns = (0..schema.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn Array> =
                    batches.iter().map(|b| b.column(c).as_ref()).collect();
                ColumnSources::new(arrays)
            })
            .collect();
        Ok(Self { schema, columns })
    }

    /// The rows `(batch, row)`, in this order, as one batch.
    pub fn gather(&self, rows: &[(usize, usize)]) -> Result<RecordBatch, ArrowError> {
        let columns = (self.columns.iter())
            .map(|c| c.gather(rows))
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(Arc::clone(&self.schema), columns)
    }
}

impl<'a> ColumnSources<'a> {
    fn new(arrays: Vec<&'a dyn Array>) -> Self {
        let data_type = arrays[0].data_type();
        if arrays.iter().any(|a| a.data_type() != data_type) {
            return Self::Other(arrays);
        }
        let nulls = |arrays: &[&'a dyn Array]| {
            (arrays.iter().any(|a| a.null_count() > 0))
                .then(|| arrays.iter().map(|a| a.nulls()).collect())
        };
        match data_type {
            DataType::Utf8View => {
                let strings = arrays.iter().map(|a| a.as_string_view());
                Self::Views {
                    views: strings.clone().map(|a| a.views().as_ref()).collect(),
                    buffers: strings.map(|a| a.data_buffers()).collect(),
                    nulls: nulls(&arrays),
                }
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => Self::Micros {
                values: (arrays.iter())
                    .map(|a| {
                        let a = a.as_primitive::<TimestampMicrosecondType>();
                        a.values().as_ref()
                    })
                    .collect(),
                data_type: data_type.clone(),
                nulls: nulls(&arrays),
            },
            _ => Self::Other(arrays),
        }
    }

    fn gather(&self, rows: &[(usize, usize)]) -> Result<ArrayRef, ArrowError> {
        Ok(match self {
            Self::Views {
                views,
                buffers,
                nulls,
            } => Arc::new(gather_views(
                views,
                buffers,
                rows,
                gather_nulls(nulls, rows),
            )),
            Self::Micros {
                values,
                data_type,
                nulls,
            } => Arc::new(
                PrimitiveArray::<TimestampMicrosecondType>::new(
                    gather_values(values, rows),
                    gather_nulls(nulls, rows),
                )
                .with_data_type(data_type.clone()),
            ),
            Self::Other(arrays) => interleave(arrays, rows)?,
        })
    }
}

/// The rows' validity, or none when no source has a null.
fn gather_nulls(nulls: &SourceNulls, rows: &[(usize, usize)]) -> Option<NullBuffer> {
    let nulls = nulls.as_ref()?;
    let mut out = NullBufferBuilder::new(rows.len());
    for &(b, r) in rows {
        out.append(nulls[b].is_none_or(|n| n.is_valid(r)));
    }
    out.finish()
}

fn gather_values<T: ArrowNativeType>(values: &[&[T]], rows: &[(usize, usize)]) -> ScalarBuffer<T> {
    let mut out = Vec::with_capacity(rows.len());
    for (i, &(b, r)) in rows.iter().enumerate() {
        if let Some(&(pb, pr)) = rows.get(i + PREFETCH_AHEAD) {
            prefetch(values[pb][pr..].as_ptr());
        }
        out.push(values[b][r]);
    }
    ScalarBuffer::from(out)
}

/// Views are copied; a view of a string longer than its inline bytes names its data
/// buffer, renumbered into the output's buffer list, which takes all of a source batch's
/// buffers once, when the first of its long strings arrives (strings themselves are not
/// copied). Arrow's interleave takes only the buffers named: this output may hold more
/// memory alive, but renumbering is an addition instead of a lookup per row. A live
/// buffer's batch has one data buffer, shared by its string columns.
fn gather_views(
    views: &[&[u128]],
    source_buffers: &[&[Buffer]],
    rows: &[(usize, usize)],
    nulls: Option<NullBuffer>,
) -> StringViewArray {
    // Index of each source's first buffer in `buffers`, u32::MAX until taken.
    let mut first_buffer = vec![u32::MAX; views.len()];
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut out = Vec::with_capacity(rows.len());
    for (i, &(b, r)) in rows.iter().enumerate() {
        if let Some(&(pb, pr)) = rows.get(i + PREFETCH_AHEAD) {
            prefetch(views[pb][pr..].as_ptr());
        }
        let view = views[b][r];
        if (view as u32) <= MAX_INLINE_VIEW_LEN {
            out.push(view);
            continue;
        }
        if first_buffer[b] == u32::MAX {
            first_buffer[b] = buffers.len() as u32;
            buffers.extend(source_buffers[b].iter().cloned());
        }
        let view = ByteView::from(view);
        let buffer_index = first_buffer[b] + view.buffer_index;
        out.push(view.with_buffer_index(buffer_index).as_u128());
    }
    // SAFETY: every view is a valid view of its source array, and a view that names a
    // buffer was renumbered to where that source's buffers sit in `buffers`, in their
    // order; inline views need no buffer.
    unsafe { StringViewArray::new_unchecked(ScalarBuffer::from(out), buffers, nulls) }
}

/// Ask for the cache line at `ptr` (a hint: never faults, no effect on results).
#[inline(always)]
pub(crate) fn prefetch<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a prefetch is a hint the CPU may drop; it never reads memory
        // architecturally, so any address is fine.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use arrow::array::{Int32Array, StringArray, StringViewBuilder, TimestampMicrosecondArray};
    use arrow::compute::{concat_batches, interleave_record_batch};
    use arrow::datatypes::{Field, Schema};

    fn batch(seed: usize, n: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8View, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("n", DataType::Int32, false),
        ]));
        // Short (inline) and long strings, a null every seventh row, and data buffers of
        // 64 bytes: a source's long strings sit in many buffers.
        let mut s = StringViewBuilder::new().with_fixed_block_size(64);
        for i in 0..n {
            match (seed + i) % 7 {
                0 => s.append_null(),
                k if k % 2 == 0 => s.append_value(format!("s{seed}-{i}")),
                _ => s.append_value(format!("a string longer than twelve bytes {seed}-{i}")),
            }
        }
        let ts =
            TimestampMicrosecondArray::from_iter_values((0..n).map(|i| (seed * 1000 + i) as i64))
                .with_timezone("UTC");
        let ints = Int32Array::from_iter_values((0..n).map(|i| (seed + i) as i32));
        let columns: Vec<ArrayRef> = vec![Arc::new(s.finish()), Arc::new(ts), Arc::new(ints)];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    #[test]
    fn gathers_the_same_rows_as_arrows_interleave() {
        let mut owned: Vec<RecordBatch> = (0..5).map(|s| batch(s, 40 + s * 13)).collect();
        // A slice: its arrays start at an offset into their buffers.
        owned.push(batch(5, 60).slice(3, 50));
        // A batch without nulls among batches with some.
        owned.push(batch(1, 5));
        assert_eq!(owned[6].column(0).nulls(), None);
        let batches: Vec<&RecordBatch> = owned.iter().collect();
        // A scattered order that visits every batch, some rows twice.
        let rows: Vec<(usize, usize)> = (0..400)
            .map(|i| {
                let b = (i * 5) % owned.len();
                (b, (i * 31) % owned[b].num_rows())
            })
            .collect();
        let ours = gather_rows(&batches, &rows).unwrap();
        assert_eq!(ours, interleave_record_batch(&batches, &rows).unwrap());
        // One set of sources gathers any number of times, as a flush does.
        let sources = RowSources::new(&batches).unwrap();
        let chunks: Vec<RecordBatch> = (rows.chunks(64))
            .map(|c| sources.gather(c).unwrap())
            .collect();
        assert_eq!(concat_batches(&ours.schema(), &chunks).unwrap(), ours);
        assert!(ours.column(0).null_count() > 0);
        // The sources whose long strings were taken lend all their buffers, each once.
        let strings = |b: usize| owned[b].column(0).as_string_view();
        let lending: HashSet<usize> = (rows.iter())
            .filter(|&&(b, r)| {
                strings(b).is_valid(r) && strings(b).value(r).len() > MAX_INLINE_VIEW_LEN as usize
            })
            .map(|&(b, _)| b)
            .collect();
        let lent: usize = lending
            .iter()
            .map(|&b| strings(b).data_buffers().len())
            .sum();
        assert!(lending.iter().all(|&b| strings(b).data_buffers().len() > 1));
        assert_eq!(ours.column(0).as_string_view().data_buffers().len(), lent);
    }

    #[test]
    fn gathers_no_rows() {
        let owned = [batch(1, 10)];
        let out = gather_rows(&[&owned[0]], &[]).unwrap();
        assert_eq!(out.num_rows(), 0);
        assert_eq!(out.schema(), owned[0].schema());
    }

    #[test]
    fn columns_of_different_types_are_an_error_as_in_arrow() {
        let views = batch(1, 10);
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)]));
        let strings = StringArray::from_iter_values(["a string longer than twelve bytes"]);
        let other = RecordBatch::try_new(schema, vec![Arc::new(strings)]).unwrap();
        let err = gather_rows(&[&views.project(&[0]).unwrap(), &other], &[(0, 1), (1, 0)]);
        assert!(err.is_err(), "{err:?}");
    }
}
