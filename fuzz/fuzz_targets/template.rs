//! Arbitrary template source rendered against an arbitrary JSON context:
//! checking and rendering return errors, never panic.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use zapflow_core::template::{check, render};

/// Deep enough to reach nested `trigger.a.b.c` lookups, shallow enough to
/// keep each input fast.
const MAX_DEPTH: usize = 4;

#[derive(Debug)]
struct Input<'a> {
    source: &'a str,
    context: Value,
}

impl<'a> Arbitrary<'a> for Input<'a> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let source = u.arbitrary()?;
        // Templates see the context's keys as variables, so it is an object,
        // usually with the `trigger` key real zaps render from.
        let mut context = object(u, 0)?;
        if u.arbitrary()? {
            let trigger = object(u, 1)?;
            context.insert("trigger".to_owned(), Value::Object(trigger));
        }
        Ok(Self {
            source,
            context: Value::Object(context),
        })
    }
}

fn object(u: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<Map<String, Value>> {
    let mut map = Map::new();
    for _ in 0..u.int_in_range(0..=4)? {
        let key: String = u.arbitrary()?;
        map.insert(key, value(u, depth + 1)?);
    }
    Ok(map)
}

fn value(u: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<Value> {
    let kinds = if depth >= MAX_DEPTH { 4 } else { 6 };
    Ok(match u.int_in_range(0..=kinds - 1)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => match u.int_in_range(0..=2)? {
            0 => Value::from(u.arbitrary::<i64>()?),
            1 => Value::from(u.arbitrary::<u64>()?),
            _ => Value::from(u.arbitrary::<f64>()?),
        },
        3 => Value::String(u.arbitrary()?),
        4 => {
            let mut items = Vec::new();
            for _ in 0..u.int_in_range(0..=4)? {
                items.push(value(u, depth + 1)?);
            }
            Value::Array(items)
        }
        _ => Value::Object(object(u, depth)?),
    })
}

fuzz_target!(|input: Input<'_>| {
    let parses = check(input.source).is_ok();
    let rendered = render(input.source, &input.context);
    // What does not parse cannot render.
    if !parses {
        assert!(rendered.is_err());
    }
});
