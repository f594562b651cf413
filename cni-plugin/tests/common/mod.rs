//! Helpers shared by the integration tests.

pub mod nft_cases;
