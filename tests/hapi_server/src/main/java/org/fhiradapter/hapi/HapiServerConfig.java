package org.fhiradapter.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.MemoryBinaryStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.JpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.searchparam.submit.config.SearchParamSubmitterConfig;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.apache.commons.dbcp2.BasicDataSource;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Meta;
import org.springframework.beans.factory.annotation.Qualifier;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.ApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

/**
 * The whole server: HAPI's own R4 JPA configuration plus what an application must supply
 * (database, entity manager, storage settings, the REST server). Settings are HAPI's defaults
 * except where a comment says why; they are what a hospital's HAPI behaves like out of the box.
 */
@Configuration
@EnableTransactionManagement
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ThreadPoolFactoryConfig.class,
	SearchParamSubmitterConfig.class,
	// rest-hook Subscriptions: matching and delivery in this JVM (in-memory channels)
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class
})
public class HapiServerConfig {

	/**
	 * A CodeableConcept at a required binding is valid when one of its codings is from the bound
	 * value set (FHIR R4, Terminologies 4.1: further codings are translations). HAPI's validator
	 * by default wants every coding to be valid, so a translation into a CodeSystem it does not
	 * hold (the CTCAE grade beside AdverseEvent.severity) fails the whole element; this HAPI
	 * setting gives the specification's rule.
	 */
	static void acceptCodeableConceptWithOneValidCoding(ApplicationContext spring) {
		spring.getBean(JpaConfig.JPA_VALIDATION_SUPPORT_CHAIN, ValidationSupportChain.class)
				.setCodeableConceptValidationSuccessfulIfNotAllCodingsAreValid(true);
	}

	@Bean
	public DataSource dataSource() {
		BasicDataSource dataSource = new BasicDataSource();
		dataSource.setDriver(new org.h2.Driver());
		// one private in-memory database per JVM, kept while the JVM runs
		dataSource.setUrl("jdbc:h2:mem:hapi;DB_CLOSE_DELAY=-1");
		dataSource.setUsername("sa");
		dataSource.setPassword("");
		dataSource.setMaxTotal(16);
		return dataSource;
	}

	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		Properties jpa = new Properties();
		jpa.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		jpa.put("hibernate.hbm2ddl.auto", "create");
		jpa.put("hibernate.search.enabled", "false");
		jpa.put("hibernate.jdbc.batch_size", "20");
		jpa.put("hibernate.cache.use_query_cache", "false");
		jpa.put("hibernate.cache.use_second_level_cache", "false");
		jpa.put("hibernate.format_sql", "false");
		jpa.put("hibernate.show_sql", "false");
		factory.setJpaProperties(jpa);
		return factory;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager manager = new JpaTransactionManager();
		manager.setEntityManagerFactory(entityManagerFactory);
		return manager;
	}

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		// the tests empty the server between tests with $expunge (expungeEverything)
		settings.setExpungeEnabled(true);
		settings.setAllowMultipleDelete(true);
		settings.setDeleteExpungeEnabled(true);
		// Everything else stays HAPI's default, notably: referential integrity enforced on write
		// and delete, client ids allowed unless purely numeric, updates without changes create
		// no new version, tags not versioned, identical searches reused for 60 s.
		return settings;
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		SubscriptionSettings settings = new SubscriptionSettings();
		settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public IBinaryStorageSvc binaryStorage() {
		return new MemoryBinaryStorageSvcImpl();
	}

	/** The delivery factory wants one even though only rest-hook channels are enabled. */
	@Bean
	public IEmailSender emailSender() {
		return details -> {
			throw new UnsupportedOperationException("email Subscriptions are not enabled");
		};
	}

	@Bean
	public RestfulServer restfulServer(
			FhirContext fhirContext,
			ResourceProviderFactory resourceProviders,
			@Qualifier("mySystemProviderR4") JpaSystemProvider<Bundle, Meta> systemProvider,
			IFhirSystemDao<Bundle, Meta> systemDao,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider) {
		RestfulServer server = new RestfulServer(fhirContext);
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("fhir-adapter test server: HAPI FHIR JPA, H2 in memory");
		server.setServerConformanceProvider(capabilities);
		// the hapi-fhir-jpaserver-starter's page sizes (HAPI's bare defaults are 10 and 50)
		pagingProvider.setDefaultPageSize(20);
		pagingProvider.setMaximumPageSize(500);
		server.setPagingProvider(pagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setServerAddressStrategy(new IncomingRequestAddressStrategy());
		return server;
	}
}
