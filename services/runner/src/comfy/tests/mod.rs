#![allow(clippy::unwrap_used)]

mod mock;
mod recordings;
