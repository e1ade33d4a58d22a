//! [`deserialize`]: postcard deserialization that keeps custom error messages.
//!
//! postcard's error type has no room for a message: every custom serde error (a user's
//! validation, typetag's "unknown variant", a shared child's failure) becomes
//! `SerdeDeCustom`. Page-in deserializes with plain postcard (the fast path), and only when a
//! node fails with such an error runs it again through [`deserialize`], which wraps postcard's
//! deserializer, visitors and accessors so that user code sees an error type of its own
//! ([`Kept`]). Where an error crosses back into postcard (which can only hold
//! `SerdeDeCustom`), its message is set aside, and picked up again where postcard returns it.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Visitor};

/// A deserialization error that keeps its message.
#[derive(Debug)]
pub(crate) struct Kept(String);

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Kept {}

impl de::Error for Kept {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Kept(msg.to_string())
    }
}

thread_local! {
    /// The message of the latest [`Kept`] handed to postcard, until postcard returns it.
    static SET_ASIDE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// `err` as the inner deserializer's error, its message set aside.
fn into_inner<E: de::Error>(err: Kept) -> E {
    let inner = E::custom(&err.0);
    SET_ASIDE.with(|slot| *slot.borrow_mut() = Some(err.0));
    inner
}

/// The inner deserializer's `err` as a [`Kept`]: the message set aside if `err` is the
/// message-less custom error it became, else `err`'s own.
fn from_inner<E: de::Error>(err: E) -> Kept {
    let set_aside = SET_ASIDE.with(|slot| slot.borrow_mut().take());
    let message = err.to_string();
    match set_aside {
        Some(kept) if message == postcard::Error::SerdeDeCustom.to_string() => Kept(kept),
        _ => Kept(message),
    }
}

/// Deserializes an `X` from `data` with postcard, keeping custom messages.
pub(crate) fn deserialize<'de, X: de::Deserialize<'de>>(data: &'de [u8]) -> Result<X, Kept> {
    SET_ASIDE.with(|slot| slot.borrow_mut().take());
    let mut deserializer = postcard::Deserializer::from_bytes(data);
    X::deserialize(Keep(&mut deserializer))
}

struct Keep<D>(D);
struct Wrap<V>(V);
struct Seed<S>(S);
struct Seq<A>(A);
struct Map<A>(A);
struct Enum<A>(A);
struct Variant<A>(A);

macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Kept> {
                self.0.$method($($arg,)* Wrap(visitor)).map_err(from_inner)
            }
        )*
    };
}

impl<'de, D: de::Deserializer<'de>> de::Deserializer<'de> for Keep<D> {
    type Error = Kept;

    forward_deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty);)*) => {
        $(
            fn $method<E: de::Error>(self, value: $ty) -> Result<Self::Value, E> {
                self.0.$method::<Kept>(value).map_err(into_inner)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none::<Kept>().map_err(into_inner)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit::<Kept>().map_err(into_inner)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_some(Keep(d)).map_err(into_inner)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_newtype_struct(Keep(d)).map_err(into_inner)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.visit_seq(Seq(seq)).map_err(into_inner)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(Map(map)).map_err(into_inner)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.0.visit_enum(Enum(data)).map_err(into_inner)
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Keep(d)).map_err(into_inner)
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Seq<A> {
    type Error = Kept;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Kept> {
        self.0.next_element_seed(Seed(seed)).map_err(from_inner)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Map<A> {
    type Error = Kept;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Kept> {
        self.0.next_key_seed(Seed(seed)).map_err(from_inner)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Kept> {
        self.0.next_value_seed(Seed(seed)).map_err(from_inner)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Enum<A> {
    type Error = Kept;
    type Variant = Variant<A::Variant>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Kept> {
        self.0
            .variant_seed(Seed(seed))
            .map(|(value, variant)| (value, Variant(variant)))
            .map_err(from_inner)
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Variant<A> {
    type Error = Kept;

    fn unit_variant(self) -> Result<(), Kept> {
        self.0.unit_variant().map_err(from_inner)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Kept> {
        self.0.newtype_variant_seed(Seed(seed)).map_err(from_inner)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Kept> {
        self.0.tuple_variant(len, Wrap(visitor)).map_err(from_inner)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Kept> {
        self.0
            .struct_variant(fields, Wrap(visitor))
            .map_err(from_inner)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Outer {
        #[allow(dead_code)]
        inner: Vec<Inner>,
    }

    #[derive(Debug)]
    struct Inner;

    impl<'de> Deserialize<'de> for Inner {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let n = u8::deserialize(d)?;
            Err(serde::de::Error::custom(format!("inner {n} refuses")))
        }
    }

    #[test]
    fn a_nested_custom_message_survives() {
        let data = postcard::to_allocvec(&vec![7u8]).unwrap();
        assert!(matches!(
            postcard::from_bytes::<Outer>(&data),
            Err(postcard::Error::SerdeDeCustom)
        ));
        let err = super::deserialize::<Outer>(&data).unwrap_err();
        assert_eq!(err.to_string(), "inner 7 refuses");
    }

    #[test]
    fn postcard_own_errors_keep_their_text() {
        let err = super::deserialize::<Outer>(&[5]).unwrap_err();
        assert_eq!(
            err.to_string(),
            postcard::Error::DeserializeUnexpectedEnd.to_string()
        );
    }
}
