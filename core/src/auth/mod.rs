//! Authentication and authorization logic, free of host calls: what a request carries, what the
//! webhook said, what the cache keeps.

pub mod cache;
pub mod canonical;
pub mod gate;
pub mod nfkc;
pub mod percent;
pub mod precheck;
pub mod reply;
pub mod token;
pub mod topic;
pub mod verdict;
