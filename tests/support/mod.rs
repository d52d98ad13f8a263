pub mod gateway;
pub mod mock;
pub mod port;
pub mod redis;
pub mod wait;
