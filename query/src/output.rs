//! Query results as the contract's formats: `json` (`{"columns", "rows", "row_count"}`),
//! `csv`, and `arrow` (an Arrow IPC stream).

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::ipc::writer::StreamWriter;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::error::DataFusionError;
use funnelhouse_schemas::time::format_micros;
use serde_json::{Value, json};

use crate::error::{QueryError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    Csv,
    Arrow,
}

impl OutputFormat {
    /// `?format=` wins over `Accept`; the default is JSON.
    pub fn negotiate(param: Option<&str>, accept: Option<&str>) -> Result<Self> {
        if let Some(p) = param {
            return match p.to_ascii_lowercase().as_str() {
                "json" => Ok(Self::Json),
                "csv" => Ok(Self::Csv),
                "arrow" => Ok(Self::Arrow),
                other => Err(QueryError::BadRequest(format!(
                    "format: {other:?} is not json, csv or arrow"
                ))),
            };
        }
        let accept = accept.unwrap_or("").to_ascii_lowercase();
        Ok(if accept.contains("text/csv") {
            Self::Csv
        } else if accept.contains("application/vnd.apache.arrow.stream") {
            Self::Arrow
        } else {
            Self::Json
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Arrow => "application/vnd.apache.arrow.stream",
        }
    }

    /// Start rendering a result with this schema.
    pub fn writer(self, schema: &SchemaRef) -> Result<ResultWriter> {
        let sink = match self {
            Self::Json => {
                let mut head = serde_json::to_vec(&json!({ "columns": columns(schema) }))
                    .expect("JSON values serialise");
                head.pop(); // the closing brace: rows follow
                head.extend_from_slice(b",\"rows\":[");
                Sink::Json(head)
            }
            Self::Csv => {
                let mut w = csv::Writer::from_writer(Vec::new());
                w.write_record(schema.fields().iter().map(|f| f.name().as_str()))
                    .map_err(csv_error)?;
                Sink::Csv(w)
            }
            Self::Arrow => Sink::Arrow(
                StreamWriter::try_new(Vec::new(), schema).map_err(DataFusionError::from)?,
            ),
        };
        Ok(ResultWriter { sink, rows: 0 })
    }
}

/// A result rendered batch by batch as it arrives, so it is held once, as the body,
/// and its size is known as it grows (the query memory pool accounts it).
pub struct ResultWriter {
    sink: Sink,
    rows: usize,
}

enum Sink {
    Json(Vec<u8>),
    Csv(csv::Writer<Vec<u8>>),
    Arrow(StreamWriter<Vec<u8>>),
}

impl ResultWriter {
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match &mut self.sink {
            Sink::Json(buf) => {
                for r in 0..batch.num_rows() {
                    if self.rows + r > 0 {
                        buf.push(b',');
                    }
                    buf.push(b'[');
                    for (i, c) in batch.columns().iter().enumerate() {
                        if i > 0 {
                            buf.push(b',');
                        }
                        serde_json::to_writer(&mut *buf, &cell(c.as_ref(), r))
                            .expect("JSON values serialise");
                    }
                    buf.push(b']');
                }
            }
            Sink::Csv(w) => {
                for r in 0..batch.num_rows() {
                    w.write_record(batch.columns().iter().map(|c| csv_cell(c.as_ref(), r)))
                        .map_err(csv_error)?;
                }
            }
            Sink::Arrow(w) => w.write(batch).map_err(DataFusionError::from)?,
        }
        self.rows += batch.num_rows();
        Ok(())
    }

    /// Bytes held so far (the buffer's capacity, not only what is written).
    pub fn held_bytes(&self) -> usize {
        match &self.sink {
            Sink::Json(buf) => buf.capacity(),
            // The csv writer's own buffer comes on top.
            Sink::Csv(w) => w.get_ref().capacity() + (8 << 10),
            Sink::Arrow(w) => w.get_ref().capacity(),
        }
    }

    /// The body; JSON ends with `"row_count"` and, when the result stopped at
    /// `max_result_rows`, `"truncated": true`.
    pub fn finish(self, truncated: bool) -> Result<Vec<u8>> {
        match self.sink {
            Sink::Json(mut buf) => {
                buf.extend_from_slice(format!("],\"row_count\":{}", self.rows).as_bytes());
                if truncated {
                    buf.extend_from_slice(b",\"truncated\":true");
                }
                buf.push(b'}');
                Ok(buf)
            }
            Sink::Csv(w) => w.into_inner().map_err(|e| csv_error(e.into_error().into())),
            Sink::Arrow(mut w) => {
                w.finish().map_err(DataFusionError::from)?;
                Ok(w.into_inner().map_err(DataFusionError::from)?)
            }
        }
    }
}

fn csv_error(e: csv::Error) -> QueryError {
    QueryError::Internal(format!("csv: {e}"))
}

fn columns(schema: &SchemaRef) -> Vec<Value> {
    schema
        .fields()
        .iter()
        .map(|f| json!({ "name": f.name(), "type": type_name(f.data_type()) }))
        .collect()
}

/// A SQL-ish type name for a column, as Postgres clients would call it.
pub fn type_name(dt: &DataType) -> String {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "integer".into(),
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => "bigint".into(),
        DataType::Float16 | DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("numeric({p},{s})"),
        DataType::Null => "null".into(),
        other => other.to_string(),
    }
}

/// One value as JSON: numbers as numbers, timestamps as RFC 3339 with µs and `Z`.
pub fn cell(col: &dyn Array, row: usize) -> Value {
    if col.is_null(row) {
        return Value::Null;
    }
    macro_rules! num {
        ($t:ty) => {
            Value::from(col.as_primitive::<$t>().value(row))
        };
    }
    use arrow::datatypes::*;
    match col.data_type() {
        DataType::Boolean => Value::Bool(col.as_boolean().value(row)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => float(f64::from(col.as_primitive::<Float32Type>().value(row))),
        DataType::Float64 => float(col.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => Value::String(col.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(col.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(col.as_string_view().value(row).to_string()),
        DataType::Timestamp(unit, _) => {
            let v = match unit {
                TimeUnit::Second => col
                    .as_primitive::<TimestampSecondType>()
                    .value(row)
                    .saturating_mul(1_000_000),
                TimeUnit::Millisecond => col
                    .as_primitive::<TimestampMillisecondType>()
                    .value(row)
                    .saturating_mul(1000),
                TimeUnit::Microsecond => col.as_primitive::<TimestampMicrosecondType>().value(row),
                TimeUnit::Nanosecond => col
                    .as_primitive::<TimestampNanosecondType>()
                    .value(row)
                    .div_euclid(1000),
            };
            Value::String(format_micros(v))
        }
        _ => Value::String(display(col, row)),
    }
}

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn display(col: &dyn Array, row: usize) -> String {
    ArrayFormatter::try_new(col, &FormatOptions::default())
        .map_or_else(|e| e.to_string(), |f| f.value(row).to_string())
}

/// A value as CSV text: like JSON but unquoted, NULL empty.
fn csv_cell(col: &dyn Array, row: usize) -> String {
    match cell(col, row) {
        Value::Null => String::new(),
        Value::String(s) => s,
        other => other.to_string(),
    }
}
