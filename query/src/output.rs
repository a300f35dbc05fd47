//! Query results as the contract's formats: `json` (`{"columns", "rows", "row_count"}`),
//! `csv`, and `arrow` (an Arrow IPC stream).

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use funnelhouse_schemas::time::format_micros;
use serde_json::{Map, Value};

use crate::error::{QueryError, Result};
use crate::session::QueryResult;

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

    pub fn render(self, result: &QueryResult) -> Result<Vec<u8>> {
        let (schema, batches) = (&result.schema, &result.batches[..]);
        match self {
            Self::Json => Ok(serde_json::to_vec(&to_json(result)).expect("JSON values serialise")),
            Self::Csv => to_csv(schema, batches),
            Self::Arrow => to_arrow_ipc(schema, batches),
        }
    }
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

/// `{"columns", "rows", "row_count"}`, plus `"truncated": true` when the result stopped
/// at `max_result_rows`.
pub fn to_json(result: &QueryResult) -> Value {
    let (schema, batches) = (&result.schema, &result.batches);
    let columns: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut m = Map::new();
            m.insert("name".into(), Value::String(f.name().clone()));
            m.insert("type".into(), Value::String(type_name(f.data_type())));
            Value::Object(m)
        })
        .collect();
    let mut rows = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            rows.push(Value::Array(
                b.columns().iter().map(|c| cell(c.as_ref(), r)).collect(),
            ));
        }
    }
    let n = rows.len();
    let mut out = serde_json::json!({ "columns": columns, "rows": rows, "row_count": n });
    if result.truncated {
        out["truncated"] = Value::Bool(true);
    }
    out
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

pub fn to_csv(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| QueryError::BadRequest(format!("csv: {e}"));
    w.write_record(schema.fields().iter().map(|f| f.name().as_str()))
        .map_err(err)?;
    for b in batches {
        for r in 0..b.num_rows() {
            w.write_record(b.columns().iter().map(|c| csv_cell(c.as_ref(), r)))
                .map_err(err)?;
        }
    }
    w.into_inner()
        .map_err(|e| QueryError::BadRequest(format!("csv: {e}")))
}

pub fn to_arrow_ipc(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, schema)
        .map_err(datafusion::error::DataFusionError::from)?;
    for b in batches {
        w.write(b)
            .map_err(datafusion::error::DataFusionError::from)?;
    }
    w.finish()
        .map_err(datafusion::error::DataFusionError::from)?;
    drop(w);
    Ok(buf)
}
