pub mod gateway;
pub mod mock;
pub mod port;
pub mod wait;
