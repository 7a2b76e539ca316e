//! The line of every mapping key in a YAML document, so problems found in parsed values can say
//! where they are. The typed parse has no spans; this second, untyped parse only runs when there is a
//! problem to locate.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Keys of one mapping: each key's line and the keys nested under it.
#[derive(Debug, Default)]
pub(crate) struct KeyLines(BTreeMap<String, (u64, KeyLines)>);

impl KeyLines {
    /// Keys of `text`; none if it does not parse (a problem is then reported without a line).
    pub(crate) fn parse(text: &str) -> Self {
        serde_saphyr::from_str(text).unwrap_or_default()
    }

    /// Line of the deepest key along `path` that the document has (a defaulted key is not written, so
    /// its parent's line is the best there is).
    pub(crate) fn line(&self, path: &[String]) -> Option<u64> {
        let (first, rest) = path.split_first()?;
        let (line, nested) = self.0.get(first)?;
        nested.line(rest).or((*line > 0).then_some(*line))
    }
}

impl<'de> Deserialize<'de> for KeyLines {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeyLinesVisitor)
    }
}

struct KeyLinesVisitor;

/// Scalars have no keys: each of these visits yields an empty set.
macro_rules! no_keys {
    ($($method:ident($type:ty)),*) => {
        $(fn $method<E: serde::de::Error>(self, _: $type) -> Result<KeyLines, E> {
            Ok(KeyLines::default())
        })*
    };
}

impl<'de> Visitor<'de> for KeyLinesVisitor {
    type Value = KeyLines;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyLines, A::Error> {
        let mut keys = BTreeMap::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let nested = map.next_value::<KeyLines>()?;
            keys.insert(key.value, (key.referenced.line(), nested));
        }
        Ok(KeyLines(keys))
    }

    // Sequences hold no keys the configuration validates.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyLines, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(KeyLines::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<KeyLines, D::Error> {
        KeyLines::deserialize(deserializer)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<KeyLines, E> {
        Ok(KeyLines::default())
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<KeyLines, E> {
        Ok(KeyLines::default())
    }

    no_keys!(visit_bool(bool), visit_i64(i64), visit_i128(i128), visit_u64(u64), visit_u128(u128), visit_f64(f64));
    no_keys!(visit_str(&str), visit_bytes(&[u8]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| (*key).to_owned()).collect()
    }

    #[test]
    fn block_and_flow_keys_have_their_lines() {
        let lines = KeyLines::parse(
            "port: 1\nlimits:\n  max_concurrent_loads: 0\nstreams:\n  sensors.v2: {chunk_size: 0}\n  b:\n    flush:\n      rows: 0\n",
        );
        assert_eq!(lines.line(&path(&["limits", "max_concurrent_loads"])), Some(3));
        assert_eq!(lines.line(&path(&["streams", "sensors.v2", "chunk_size"])), Some(5));
        assert_eq!(lines.line(&path(&["streams", "b", "flush", "rows"])), Some(8));
        // A key that is not written falls back to its parent's line.
        assert_eq!(lines.line(&path(&["streams", "b", "flush", "bytes"])), Some(7));
        assert_eq!(lines.line(&path(&["nowhere"])), None);
    }

    #[test]
    fn text_that_does_not_parse_locates_nothing() {
        assert_eq!(KeyLines::parse("a: [\n").line(&path(&["a"])), None);
    }
}
