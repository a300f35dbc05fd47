//! `window_funnel(window_seconds, ts, cond1, cond2, ...)`: the deepest funnel level
//! (0..k) reached in the group, with the contract's semantics (ClickHouse `windowFunnel`
//! default mode, except that one row fills at most one step).
//!
//! ```sql
//! SELECT channel, window_funnel(86400, ts, event = 'scan', event = 'view') AS level, count(*)
//! FROM events GROUP BY user_id, channel
//! ```

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, TimeUnit, UInt64Type};
use datafusion::common::utils::SingleRowListArrayBuilder;
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::expressions::Literal;

use crate::funnel::chain::{ChainParams, FunnelEvent, evaluate};

/// Most steps a funnel may have (one bit each).
pub const MAX_STEPS: usize = 64;

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct WindowFunnel {
    signature: Signature,
}

impl WindowFunnel {
    pub fn udaf() -> AggregateUDF {
        AggregateUDF::from(WindowFunnel {
            signature: Signature::variadic_any(Volatility::Immutable),
        })
    }
}

impl AggregateUDFImpl for WindowFunnel {
    fn name(&self) -> &str {
        "window_funnel"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        if args.len() < 3 || args.len() - 2 > MAX_STEPS {
            return plan_err!(
                "window_funnel(window_seconds, ts, cond1, ...) takes a window, a timestamp and 1..{MAX_STEPS} conditions"
            );
        }
        if !args[0].is_numeric() {
            return plan_err!(
                "window_funnel: window_seconds must be a number, got {}",
                args[0]
            );
        }
        if !matches!(args[1], DataType::Timestamp(..)) {
            return plan_err!(
                "window_funnel: the second argument must be a timestamp, got {}",
                args[1]
            );
        }
        if let Some(t) = args[2..]
            .iter()
            .find(|t| !matches!(t, DataType::Boolean | DataType::Null))
        {
            return plan_err!("window_funnel: conditions must be boolean, got {t}");
        }
        Ok(DataType::Int64)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let Some(lit) = args.exprs[0].downcast_ref::<Literal>() else {
            return plan_err!("window_funnel: window_seconds must be a constant");
        };
        let secs = match lit.value().cast_to(&DataType::Float64)? {
            ScalarValue::Float64(Some(s)) if s >= 0.0 => s,
            other => return plan_err!("window_funnel: window_seconds must be >= 0, got {other}"),
        };
        Ok(Box::new(WindowFunnelAccumulator {
            window: (secs * 1e6).round() as i64,
            steps: args.exprs.len() - 2,
            events: Vec::new(),
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let list = |name: &str, item: DataType| {
            Arc::new(Field::new_list(
                format_state_name(args.name, name),
                Field::new_list_field(item, true),
                true,
            ))
        };
        Ok(vec![
            list("ts", DataType::Int64),
            list("steps", DataType::UInt64),
        ])
    }
}

/// The (ts, matched steps) of every row of the group that matches any step.
#[derive(Debug)]
struct WindowFunnelAccumulator {
    window: i64,
    steps: usize,
    events: Vec<FunnelEvent>,
}

impl Accumulator for WindowFunnelAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let ts = arrow::compute::cast(
            &values[1],
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )?;
        let ts = ts.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let conds: Vec<_> = values[2..].iter().map(|c| c.as_boolean_opt()).collect();
        for row in 0..ts.len() {
            if ts.is_null(row) {
                continue;
            }
            let mut steps = 0u64;
            for (i, c) in conds.iter().enumerate() {
                if c.is_some_and(|c| c.is_valid(row) && c.value(row)) {
                    steps |= 1 << i;
                }
            }
            if steps != 0 {
                self.events.push(FunnelEvent {
                    ts: ts.value(row),
                    steps,
                });
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let ts: Int64Array = self.events.iter().map(|e| e.ts).collect();
        let steps: UInt64Array = self.events.iter().map(|e| e.steps).collect();
        Ok(vec![
            SingleRowListArrayBuilder::new(Arc::new(ts)).build_list_scalar(),
            SingleRowListArrayBuilder::new(Arc::new(steps)).build_list_scalar(),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let (ts, steps) = (states[0].as_list::<i32>(), states[1].as_list::<i32>());
        for row in 0..ts.len() {
            if ts.is_null(row) {
                continue;
            }
            let t = ts.value(row);
            let s = steps.value(row);
            let (t, s) = (
                t.as_primitive::<Int64Type>(),
                s.as_primitive::<UInt64Type>(),
            );
            if t.len() != s.len() {
                return exec_err!("window_funnel: inconsistent state");
            }
            self.events.extend(
                t.values()
                    .iter()
                    .zip(s.values())
                    .map(|(&ts, &steps)| FunnelEvent { ts, steps }),
            );
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.events.sort_unstable_by_key(|e| (e.ts, e.steps));
        let params = ChainParams {
            steps: self.steps,
            window: self.window,
            from: None,
            to: None,
            as_of: None,
        };
        Ok(ScalarValue::Int64(Some(
            evaluate(&self.events, &params).level as i64,
        )))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.events.capacity() * std::mem::size_of::<FunnelEvent>()
    }
}
