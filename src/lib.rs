
pub mod store;
pub mod meta_store;
